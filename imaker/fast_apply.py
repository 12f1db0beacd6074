"""Batched segment inference for demucs models (no Dagster).

``apply_model_batched`` computes what ``demucs.apply.apply_model(model, mix, split=True)``
computes — the same windows (segment length from each model of a bag, stride
``(1 - overlap) * segment``, the short last window padded with context like
``TensorChunk.padded`` and cut back like ``center_trim``), the same triangular overlap-add
weights raised to ``transition_power``, the same ``shifts`` (one ``random.randint(0, 0.5 s)``
per shift and per model of a bag, in demucs' order, so a seeded ``random`` gives the same
offsets) and the same per-source weights of a ``BagOfModels`` — but:

* it runs ``batch_size`` windows per forward pass (the model normalises every item of a
  batch on its own, so batching does not change the maths);
* it never builds the padded/shifted copies of the input nor one output per shift or per
  model: windows are cut from the input as they are needed (at most ``batch_size`` at a
  time) and every window is added, already normalised and weighted, into one preallocated
  output tensor on the input's device;
* on CUDA it can run under bf16/fp16 autocast with the STFT, iSTFT and masking kept in
  fp32.
"""

from __future__ import annotations

import random
import threading
import time
import typing as tp

import torch
from torch.nn import functional as F

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
_SPECTRAL = ("_spec", "_ispec", "_mask")


def _autocast_dtype(value) -> torch.dtype | None:
    if value is None or value is False:
        return None
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"autocast_dtype={value!r}: expected bf16 or fp16") from None


def keep_spectral_fp32(model: torch.nn.Module) -> None:
    """Make the model's STFT/iSTFT/masking (``_spec``, ``_ispec``, ``_mask`` of HTDemucs and
    HDemucs) run in fp32 with autocast disabled. Idempotent; a no-op for the maths when
    autocast is off (fp32 inputs are passed through unchanged), so the model can still be
    used by ``demucs.apply.apply_model``."""
    if getattr(model, "_imaker_fp32_spectral", False):
        return
    for name in _SPECTRAL:
        method = getattr(model, name, None)
        if method is None:
            continue

        def fp32(*args, _method=method, **kwargs):
            device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
            args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                         for a in args)
            with torch.autocast(device_type, enabled=False):
                return _method(*args, **kwargs)

        object.__setattr__(model, name, fp32)
    object.__setattr__(model, "_imaker_fp32_spectral", True)


def _forward(runner, batch: torch.Tensor, device: torch.device,
             dtype: torch.dtype | None) -> torch.Tensor:
    with torch.inference_mode():
        if dtype is not None:
            with torch.autocast(device.type, dtype=dtype):
                return runner(batch)
        return runner(batch)


class WindowBatcher:
    """Runs the windows of concurrent separations in common forward passes (the separation
    service on CUDA: one pass of 2 x 8 windows keeps a GPU busier than two passes of 8).

    Each separation thread calls it instead of the model; calls that wait at the same time
    with the same model, window shape, device and autocast dtype are concatenated (up to
    ``max_items`` windows) and run once by one of the callers (the leader), and each gets
    its own rows back. HTDemucs treats every item of a batch on its own (it normalises per
    item), as do RoFormer networks (``RoformerModel.separate(batcher=)``: per-item STFT and
    transformers), so the result is what separate passes give, up to float rounding. The
    service keeps one per model (``Service.batcher_for``). One leader at a time: when its
    own windows are done it hands the role to a waiting caller."""

    def __init__(self, max_items: int = 16, gather_s: float = 0.02):
        self.max_items = max(1, int(max_items))
        self.gather_s = gather_s  # how long a pass waits for the others' windows
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._seen: dict[int, float] = {}  # caller thread -> time of its last call
        self._pending: list[dict] = []
        self._leader = False
        self.passes = 0  # forward passes run (tests, /health)
        self.merged = 0  # of which held windows of more than one caller
        # measured on CUDA (the separation service's admission, ``separator.admission``):
        # the peak device memory a pass allocated per window in it (its concatenated input,
        # activations and output; the largest seen), the bytes of one caller's window as it
        # waits on the device, the most windows one caller handed over at once, and the
        # device memory free for us after the first pass (the weights already loaded)
        self.pass_bytes_per_window = 0
        self.input_bytes_per_window = 0
        self.windows_per_call = 0
        self.device_free: tuple[int, int] | None = None  # (driver's free, allocator's cached)

    def __call__(self, runner, batch: torch.Tensor, device: torch.device,
                 dtype: torch.dtype | None) -> torch.Tensor:
        req = {"runner": runner, "batch": batch, "key": (id(runner), tuple(batch.shape[1:]),
                                                         str(device), str(dtype)),
               "device": device, "dtype": dtype, "event": threading.Event(), "result": None,
               "error": None, "lead": False}
        with self._cond:
            self._seen[threading.get_ident()] = time.monotonic()
            self.windows_per_call = max(self.windows_per_call, int(batch.shape[0]))
            if batch.shape[0]:
                self.input_bytes_per_window = max(
                    self.input_bytes_per_window,
                    batch.element_size() * batch[0].numel())
            self._pending.append(req)
            if not self._leader:
                self._leader = req["lead"] = True
            self._cond.notify_all()
        while not req["lead"]:
            req["event"].wait()
            req["event"].clear()
            if req["error"] is not None:
                raise req["error"]
            if req["result"] is not None:
                return req["result"]
        return self._lead(req)

    def _others_active(self) -> bool:
        now, me = time.monotonic(), threading.get_ident()
        return any(now - t < 1.0 for tid, t in self._seen.items() if tid != me)

    def _lead(self, own: dict) -> torch.Tensor:
        while True:
            with self._cond:
                if own["result"] is not None or own["error"] is not None:
                    # hand over: the first waiting caller leads now
                    nxt = next(iter(self._pending), None)
                    if nxt is None:
                        self._leader = False
                    else:
                        nxt["lead"] = True
                        nxt["event"].set()
                    break
                if len(self._pending) == 1 and self._others_active():
                    # another separation is between two passes: give its windows a moment
                    self._cond.wait_for(lambda: len(self._pending) > 1, timeout=self.gather_s)
                key = self._pending[0]["key"]
                group, size = [], 0
                for req in self._pending:
                    if req["key"] == key and (not group or
                                              size + req["batch"].shape[0] <= self.max_items):
                        group.append(req)
                        size += req["batch"].shape[0]
                for req in group:
                    self._pending.remove(req)
            try:
                first = group[0]
                batch = torch.cat([r["batch"] for r in group], 0) if len(group) > 1 \
                    else first["batch"]
                device = torch.device(first["device"])
                if device.type == "cuda":
                    res = self._measured(device, batch.shape[0], lambda: _forward(
                        first["runner"], batch, first["device"], first["dtype"]))
                else:
                    res = _forward(first["runner"], batch, first["device"], first["dtype"])
                self.passes += 1
                self.merged += len(group) > 1
                start = 0
                for req in group:
                    n = req["batch"].shape[0]
                    req["result"] = res[start:start + n]
                    start += n
            except BaseException as exc:  # noqa: BLE001 - every caller of the pass gets it
                for req in group:
                    req["error"] = exc
            for req in group:
                if req is not own:
                    req["event"].set()
        if own["error"] is not None:
            raise own["error"]
        return own["result"]


    def _measured(self, device: torch.device, windows: int, forward) -> torch.Tensor:
        """Run one pass on a CUDA device and record its peak allocation per window (peak
        allocated during it minus what was allocated before: the concatenated input, the
        activations, the output). The peak counter is the process's: passes on one device
        are measured one at a time (``_CUDA_PASS``; they share one stream there anyway)."""
        with _CUDA_PASS.setdefault(str(device), threading.Lock()):
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            res = forward()
            peak = torch.cuda.max_memory_allocated(device)
            per_window = max(0, peak - before) // max(1, windows)
            self.pass_bytes_per_window = max(self.pass_bytes_per_window, per_window)
            if self.device_free is None:
                free, _ = torch.cuda.mem_get_info(device)
                cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
                self.device_free = (int(free), int(cached))
        return res


#: one lock per CUDA device around measured passes (``WindowBatcher._measured``)
_CUDA_PASS: dict[str, threading.Lock] = {}


def _valid_length(model, segment: float | None, chunk_length: int) -> int:
    """The length ``apply_model``'s unsplit branch pads a window to."""
    from demucs.htdemucs import HTDemucs

    if isinstance(model, HTDemucs) and segment is not None:
        return int(segment * model.samplerate)
    if hasattr(model, "valid_length"):
        return int(model.valid_length(chunk_length))
    return chunk_length


def _forward_draws(model) -> tp.Callable[[], None] | None:
    """What one forward pass draws from Python's ``random``: HTDemucs' cross-transformer with
    ``emb="sin"`` calls ``random.randrange(sin_random_shift + 1)`` once per forward. demucs
    runs one forward per window, we run one per batch; drawing the missing ones keeps the
    ``random`` state — hence the shift offsets of later shifts and of later models of a
    bag — the same as ``apply_model``'s. (With ``sin_random_shift > 0`` a batch shares one
    position shift; the pretrained models use 0.)"""
    transformer = getattr(model, "crosstransformer", None)
    if transformer is None or getattr(transformer, "emb", None) != "sin":
        return None
    bound = int(getattr(transformer, "sin_random_shift", 0)) + 1
    return lambda: random.randrange(bound)


class _Window(tp.NamedTuple):
    offset: int          # start in the split view's coordinates
    length: int          # samples kept (the chunk length)
    valid_length: int    # samples fed to the model
    start: int           # first sample fed, in the source tensor's coordinates


def apply_model_batched(model, mix: torch.Tensor, *, shifts: int = 1, overlap: float = 0.25,
                        segment: float | None = None, batch_size: int = 8, device=None,
                        autocast_dtype=None,
                        transition_power: float = 1.0,
                        on_batch: tp.Callable[[], None] | None = None,
                        sink: tp.Callable[[int, torch.Tensor], None] | None = None,
                        batcher: "WindowBatcher | None" = None,
                        runner_for: tp.Callable[[torch.nn.Module], tp.Callable] | None = None
                        ) -> torch.Tensor | None:
    """Separate ``mix`` (``(batch, channels, samples)`` or ``(channels, samples)``).

    Returns ``(batch, sources, channels, samples)`` (or without the batch dimension) on
    ``mix.device`` in fp32, equal to ``demucs.apply.apply_model(model, mix, shifts=shifts,
    split=True, overlap=overlap, segment=segment, transition_power=transition_power)`` up to
    float rounding (exactly the same windows and shift offsets). ``device`` is where the
    model runs (default ``mix.device``). ``autocast_dtype`` (``"bf16"``/``"fp16"`` or a
    torch dtype; CUDA is where it pays) runs the networks under autocast with the spectral
    parts in fp32. ``on_batch`` is called before every forward pass (``imaker.separation``
    re-balances CPU threads between processes there). ``batcher``: a ``WindowBatcher`` shared by concurrent
    separations, which runs their windows in common forward passes. ``runner_for(model)``:
    what computes ``model(batch)`` for each model (default the model itself): another
    inference backend (``imaker.backends``); the windows, overlap-add and shifts are ours.

    ``sink(start, chunk)`` streams the output instead of returning it: ``chunk`` is
    ``(batch, sources, channels, n)`` (without the batch dimension for a 2-D ``mix``) for
    samples ``start .. start + n``, handed over in order as soon as no later window adds to
    them, and only valid during the call (copy what you keep). With one model and
    ``shifts <= 1`` only a rolling buffer of about ``batch_size`` strides + one segment is
    held, so the output never exists whole (a 1-hour track's 4 stems would be 2.5 GB);
    otherwise (several shifts or models add over the whole track) the whole output is
    computed and handed over in one chunk. Returns None when ``sink`` is given."""
    from demucs.apply import BagOfModels

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not 0 <= overlap < 1:
        raise ValueError("overlap must be in [0, 1)")
    if transition_power < 1:
        raise ValueError("transition_power < 1 leads to weird behavior")
    squeeze = mix.dim() == 2
    if squeeze:
        mix = mix[None]
    if mix.dim() != 3:
        raise ValueError(f"expected (batch, channels, samples), got {tuple(mix.shape)}")
    device = mix.device if device is None else torch.device(device)
    dtype = _autocast_dtype(autocast_dtype)
    mix = mix.float()
    n, channels, length = mix.shape
    sources = list(model.sources)

    if isinstance(model, BagOfModels):
        members = list(zip(model.models, model.weights))
        totals = [sum(float(w[k]) for _, w in members) for k in range(len(sources))]
        scales = [[float(w[k]) / totals[k] for k in range(len(sources))] for _, w in members]
    else:
        members = [(model, None)]
        scales = [[1.0] * len(sources)]

    streaming = sink is not None and len(members) == 1 and shifts <= 1
    if streaming:
        seg = segment if segment is not None else members[0][0].segment
        seg_len = int(members[0][0].samplerate * seg) if seg else length
        capacity = min(length, batch_size * max(1, int((1 - overlap) * seg_len)) + seg_len)
    else:
        capacity = length
    out = _Output((n, len(sources), channels), length, capacity, mix.device,
                  sink if streaming else None, squeeze)
    for (sub, _), scale in zip(members, scales):
        original = next(iter(sub.parameters())).device
        sub.to(device)
        sub.eval()
        if dtype is not None:
            keep_spectral_fp32(sub)
        runner = runner_for(sub) if runner_for is not None else sub
        try:
            if shifts:
                max_shift = int(0.5 * sub.samplerate)
                per_shift = [s / shifts for s in scale]
                for _ in range(shifts):
                    offset = random.randint(0, max_shift)
                    # demucs: pad the mix by max_shift on both sides, view it from `offset`
                    # for length + max_shift - offset samples, split that view, and keep
                    # its output from max_shift - offset on.
                    _split(runner, sub, mix, out, source_shift=max_shift, view_offset=offset,
                           view_length=length + max_shift - offset,
                           out_shift=max_shift - offset, scale=per_shift, segment=segment,
                           overlap=overlap, transition_power=transition_power,
                           batch_size=batch_size, device=device, dtype=dtype,
                           on_batch=on_batch, batcher=batcher)
            else:
                _split(runner, sub, mix, out, source_shift=0, view_offset=0, view_length=length,
                       out_shift=0, scale=scale, segment=segment, overlap=overlap,
                       transition_power=transition_power, batch_size=batch_size,
                       device=device, dtype=dtype, on_batch=on_batch, batcher=batcher)
        finally:
            sub.to(original)
    out.release(length)
    if sink is not None:
        if not streaming:
            sink(0, out.buf[0] if squeeze else out.buf)
        return None
    return out.buf[0] if squeeze else out.buf


class _Output:
    """Where the windows are added: the whole ``(batch, sources, channels, length)`` output,
    or (with a ``sink``) a rolling buffer of ``capacity`` samples starting at ``base``;
    ``release(upto)`` hands ``[base, upto)`` to the sink and moves the buffer on."""

    def __init__(self, shape: tuple[int, int, int], length: int, capacity: int, device,
                 sink: tp.Callable[[int, torch.Tensor], None] | None, squeeze: bool):
        self.length, self.sink, self.squeeze, self.base = length, sink, squeeze, 0
        self.buf = torch.zeros(*shape, capacity, dtype=torch.float32, device=device)

    def add(self, lo: int, hi: int, part: torch.Tensor) -> None:
        a, b = lo - self.base, hi - self.base
        if a < 0 or b > self.buf.shape[-1]:  # a bug, never bad input
            raise RuntimeError(f"window [{lo}, {hi}) outside the buffer at {self.base}")
        self.buf[..., a:b] += part

    def release(self, upto: int) -> None:
        if self.sink is None:
            return
        k = min(upto, self.length) - self.base
        if k <= 0:
            return
        chunk = self.buf[..., :k]
        self.sink(self.base, chunk[0] if self.squeeze else chunk)
        keep = self.buf.shape[-1] - k
        if keep > 0:
            self.buf[..., :keep] = self.buf[..., k:].clone()
        self.buf[..., keep:] = 0
        self.base += k


def _split(runner, model, mix: torch.Tensor, out: _Output, *, source_shift: int,
           view_offset: int, view_length: int, out_shift: int, scale: list[float],
           segment: float | None, overlap: float, transition_power: float, batch_size: int,
           device: torch.device, dtype: torch.dtype | None,
           on_batch: tp.Callable[[], None] | None = None,
           batcher: "WindowBatcher | None" = None) -> None:
    """One split pass of ``model`` over a view of the (virtually zero-padded) ``mix``, added
    into ``out``: view sample ``i`` is ``mix[..., view_offset + i - source_shift]`` (zero
    outside ``mix``), and its output goes to ``out[..., i - out_shift]``."""
    length = out.length
    seg = segment if segment is not None else model.segment
    if seg is None or not seg > 0:
        raise ValueError("the model has no segment length; pass segment=")
    segment_length = int(model.samplerate * seg)
    stride = int((1 - overlap) * segment_length)
    if stride < 1:
        raise ValueError("segment/overlap give a stride of 0 samples")
    offsets = range(0, view_length, stride)
    weight = torch.cat([torch.arange(1, segment_length // 2 + 1, device=device),
                        torch.arange(segment_length - segment_length // 2, 0, -1, device=device)])
    weight = (weight / weight.max()) ** transition_power
    scale_t = torch.tensor(scale, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    draw = _forward_draws(model)

    def norm_weight(o: int, cl: int) -> torch.Tensor:
        # demucs divides the overlap-added output by sum_weight, accumulated over all
        # windows in offset order; rebuild that sum over [o, o + cl) only (same order,
        # same float32 values) and fold the division into this window's weight.
        total = torch.zeros(cl, device=device)
        first = max(0, -(-(o - segment_length + 1) // stride))
        last = min(len(offsets) - 1, (o + cl - 1) // stride)
        for j in range(first, last + 1):
            other = offsets[j]
            other_len = min(view_length - other, segment_length)
            lo, hi = max(o, other), min(o + cl, other + other_len)
            if hi > lo:
                total[lo - o:hi - o] += weight[lo - other:hi - other]
        return weight[:cl] / total

    def window(o: int) -> _Window:
        cl = min(view_length - o, segment_length)
        vl = _valid_length(model, segment, cl)
        delta = vl - cl
        return _Window(o, cl, vl, view_offset + o - delta // 2 - source_shift)

    def cut(w: _Window) -> torch.Tensor:
        lo, hi = max(0, w.start), min(mix.shape[-1], w.start + w.valid_length)
        if hi <= lo:
            return mix.new_zeros(mix.shape[0], mix.shape[1], w.valid_length)
        return F.pad(mix[..., lo:hi], (lo - w.start, w.start + w.valid_length - hi))

    def run(group: list[_Window]) -> None:
        if on_batch is not None:
            on_batch()
        n = mix.shape[0]
        batch = torch.cat([cut(w) for w in group], 0)
        batch = batch.to(device, non_blocking=True)
        if batcher is not None:
            res = batcher(runner, batch, device, dtype)
        else:
            res = _forward(runner, batch, device, dtype)
        if draw is not None:
            for _ in range(len(group) - 1):
                draw()
        res = res.float()
        res = res.view(len(group), n, *res.shape[1:])
        for i, w in enumerate(group):
            delta = w.valid_length - w.length
            part = res[i, ..., delta // 2: delta // 2 + w.length]
            part = part * (norm_weight(w.offset, w.length) * scale_t)
            a, b = w.offset - out_shift, w.offset + w.length - out_shift
            lo, hi = max(0, a), min(length, b)
            if hi > lo:
                out.add(lo, hi, part[..., lo - a:hi - a].to(out.buf.device))
        # no later window of this pass starts before the next offset
        out.release(group[-1].offset + stride - out_shift)

    group: list[_Window] = []
    for o in offsets:
        w = window(o)
        if group and (w.valid_length != group[0].valid_length or len(group) == batch_size):
            run(group)
            group = []
        group.append(w)
    if group:
        run(group)
