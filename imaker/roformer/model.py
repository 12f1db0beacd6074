"""Loading a RoFormer checkpoint and separating a track with it (no Dagster).

    model = load(repo / "name.ckpt", repo / "name.yaml", device="cpu")
    stems = model.separate(wav)                      # {"vocals": (2, n), "other": (2, n)}
    model.separate(wav, sink=lambda start, chunk: ...)  # streamed, bounded memory

Windowing is audio-separator's MDXC path for RoFormer models (0.47.1,
``MDXCSeparator.demix``), which is what UVR and audio-separator users run these checkpoints
with: windows of ``chunk_size`` samples every ``chunk_size // num_overlap`` samples, the
last window ending at the end of the track, each output weighted by a symmetric Hamming
window of ``chunk_size`` samples and the sum divided by the sum of the weights. Unlike
it, windows are run ``batch_size`` at a time and the output leaves in order through a
rolling buffer (a ``sink``), so nothing of the size of the track is allocated here.
"""

from __future__ import annotations

import functools
import hashlib
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import RoformerConfig, RoformerConfigError, read_config
from .net import release_freed_memory


class RoformerError(RuntimeError):
    """A checkpoint that cannot be loaded or run; ``str()`` is one line naming the file."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def model_files(name: str, repo: Path) -> tuple[Path, Path]:
    """``(<repo>/<name>.ckpt, <repo>/<name>.yaml)``; RoformerError naming what is missing."""
    repo = Path(repo)
    ckpt, yaml_path = repo / f"{name}.ckpt", repo / f"{name}.yaml"
    missing = [p.name for p in (ckpt, yaml_path) if not p.is_file()]
    if missing:
        raise RoformerError(f"RoFormer model {name!r} is not in {repo}: missing "
                            f"{' and '.join(missing)}")
    return ckpt, yaml_path


def is_roformer(name: str, repo: Path) -> bool:
    """Whether ``repo`` holds ``<name>.ckpt`` beside ``<name>.yaml`` (a RoFormer model;
    demucs bags are ``<name>.yaml`` with ``.th`` weights)."""
    return (Path(repo) / f"{name}.ckpt").is_file() and (Path(repo) / f"{name}.yaml").is_file()


def read_state_dict(ckpt: Path) -> dict:
    """The checkpoint's state dict (plain, or under ``state_dict`` / ``model`` as some
    trainers save it), loaded with ``weights_only=True`` (no code runs)."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line for a person
        text = " ".join(str(exc).split())[:300]
        raise RoformerError(f"{ckpt}: not a loadable checkpoint ({type(exc).__name__}: {text})") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise RoformerError(f"{ckpt}: not a state dict of tensors")
    return state


def build_net(config: RoformerConfig, device: str | None = None):
    """The network of ``config``; ``device="meta"``: parameters without storage (no random
    init), for ``load_state_dict(..., assign=True)``."""
    import torch

    from .net import RoformerNet

    try:
        with torch.device(device) if device else nullcontext():
            return RoformerNet(config.architecture, **config.model)
    except (ValueError, TypeError) as exc:
        raise RoformerConfigError(f"{config.path}: {exc}") from None


def _mismatch(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."


@dataclass
class RoformerModel:
    """A loaded RoFormer model. ``sources``/``stems``: the stem names ``separate`` gives,
    in order (see ``RoformerConfig.stems``)."""

    name: str
    config: RoformerConfig
    net: object = field(repr=False)
    device: str
    sha256: str
    ckpt: Path
    load_seconds: float = 0.0
    #: (core, autocast) -> the runner handed to a ``WindowBatcher`` (one object per
    #: pair: the batcher merges the passes of callers with the same runner)
    _batch_runners: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---- what separation.LoadedModel also has ----
    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def samplerate(self) -> int:
        return self.config.samplerate

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def sources(self) -> tuple[str, ...]:
        return self.config.stems

    stems = sources

    @property
    def instruments(self) -> tuple[str, ...]:
        return self.config.stems

    @property
    def signature(self) -> str:
        """Model identity for data versions: name + checkpoint sha256 prefix."""
        return f"{self.name}@{self.sha256[:12]}"

    @property
    def chunk_size(self) -> int:
        return self.config.chunk_size

    @property
    def num_overlap(self) -> int:
        return self.config.num_overlap

    @property
    def parameters(self) -> int:
        from .net import parameter_count

        return parameter_count(self.net)

    def describe(self) -> dict:
        """Provenance for stems.json / the manifest."""
        return {"name": self.name, "family": "roformer", "architecture": self.architecture,
                "sha256": self.sha256, "stems": list(self.sources),
                "samplerate": self.samplerate, "chunk_size": self.chunk_size,
                "num_overlap": self.num_overlap, "device": str(self.device),
                "precision": "fp32"}

    # ---- inference ----
    def separate(self, wav: np.ndarray, *, batch_size: int | None = None, sink=None,
                 threads: Callable[[], int] | None = None, chunk_size: int | None = None,
                 num_overlap: int | None = None, runner=None, autocast: str | None = None,
                 batcher=None) -> dict[str, np.ndarray] | None:
        """Separate ``wav`` (``(channels, samples)`` at ``samplerate``) into ``{stem:
        float32 (channels, samples)}``, or stream it: ``sink(start, chunk)`` with ``chunk``
        a float32 ``(stems, channels, n)`` array for samples ``start .. start + n`` (valid
        during the call only), called in order, covering the track; then returns None.

        ``batch_size`` windows per forward pass (default: the config's
        ``inference.batch_size`` on CUDA, 1 on the CPU); ``threads``: called before each
        forward pass on the CPU, the torch threads to use; ``chunk_size``/``num_overlap``
        override the config's windowing; ``runner(batch) -> masks`` replaces the network's
        ``core`` (another backend); ``autocast`` ("bf16" or "fp16"): run ``core`` under
        torch autocast (the STFT, band split, masking and iSTFT stay fp32; bf16 measured
        at 43-44 dB against the fp32 reference at the published sizes,
        benchmarks/RESULTS.md; the service passes ``separation.roformer_autocast``).
        Several threads may separate with one model at once (the network holds no
        per-call state). ``batcher``: a ``fast_apply.WindowBatcher`` shared by concurrent
        separations (the service on CUDA): each batch of windows goes through
        ``batcher(runner, windows, device, None)``, which runs the windows of the callers
        waiting at once with the same model, autocast and window length in one pass of
        the whole network (STFT to iSTFT; ``runner`` applies the autocast to ``core``
        itself); every item of a batch is computed on its own, so the output is that of
        separate passes up to float rounding."""
        import torch

        if wav.ndim != 2 or wav.shape[0] != self.channels:
            raise RoformerError(f"{self.name}: expected {self.channels} channels, got shape "
                                f"{tuple(wav.shape)}")
        cuda = str(self.device).startswith("cuda")
        if batch_size is None:
            batch_size = self.config.batch_size if cuda else 1
        if batch_size < 1:
            raise RoformerError(f"batch_size must be >= 1, got {batch_size}")
        chunk = int(chunk_size or self.chunk_size)
        overlap = int(num_overlap or self.num_overlap)
        step = chunk // overlap
        if step < 1:
            raise RoformerError(f"num_overlap={overlap} is larger than the chunk ({chunk})")
        n = int(wav.shape[1])
        mix = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
        target = self.config.target_instrument is not None
        n_out = len(self.sources)
        if sink is None:
            full = np.zeros((n_out, self.channels, n), dtype=np.float32)

            def sink(start: int, part: np.ndarray) -> None:  # noqa: F811 - the default sink
                full[..., start:start + part.shape[-1]] = part
        else:
            full = None

        def emit(start: int, stems: torch.Tensor) -> None:
            # stems: (net stems, channels, k) final values for [start, start + k)
            if target:
                piece = mix[:, start:start + stems.shape[-1]]
                stems = torch.cat([stems[:1], (piece - stems[0])[None]], 0)
            sink(start, stems.numpy())

        starts = window_starts(n, chunk, step)
        window = torch.from_numpy(np.hamming(chunk).astype(np.float32))
        acc = _Accumulator(self.config.num_stems, self.channels, chunk, batch_size, step, emit)
        core = runner or self.net.core
        if batcher is not None:
            shared = self._batch_runner(core, autocast)
            device = torch.device(self.device)
        with torch.inference_mode():
            for i in range(0, len(starts), batch_size):
                group = starts[i:i + batch_size]
                # windows of one length per pass (only a track shorter than a chunk has
                # a short one, and then it is the only window)
                if threads is not None and not cuda:
                    want = int(threads())
                    if want > 0 and torch.get_num_threads() != want:
                        torch.set_num_threads(want)
                parts = torch.stack([mix[:, s:s + chunk] for s in group])
                length = parts.shape[-1]
                parts = parts.to(self.device)
                if batcher is not None:
                    out = batcher(shared, parts, device, None)
                else:
                    out = self._forward(parts, core, autocast)
                out = out.float().cpu()
                for j, s in enumerate(group):
                    safe = min(length, out.shape[-1], chunk)
                    acc.add(s, out[j, ..., :safe], window[:safe])
                nxt = starts[i + batch_size] if i + batch_size < len(starts) else n
                acc.release(min(nxt, n))
            acc.release(n)
        if full is not None:
            return {name: full[k] for k, name in enumerate(self.sources)}
        return None

    def _batch_runner(self, core, autocast: str | None):
        """The network as one callable for a ``WindowBatcher``: ``runner(windows) ->
        (b, stems, channels, samples)``, the same object for the same ``core`` and
        ``autocast`` (the batcher's key holds it; ``setdefault``: one wins when two
        threads make it at once)."""
        key = (core, autocast)
        runner = self._batch_runners.get(key)
        if runner is None:
            runner = self._batch_runners.setdefault(
                key, functools.partial(self._forward, core=core, autocast=autocast))
        return runner

    def _forward(self, audio, core, autocast: str | None = None):
        import torch

        net = self.net
        spec = net.spectrogram(audio)
        x = net.features(spec)
        if autocast:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
            with torch.autocast(audio.device.type, dtype=dtype):
                masks = core(x).float()
        else:
            masks = core(x).float()
        length = audio.shape[-1] if net.match_input_audio_length else None
        return net.waveform(net.apply_masks(spec, masks), length)


def window_starts(n: int, chunk: int, step: int) -> list[int]:
    """Window offsets as audio-separator 0.47.1 lays them out: every ``step`` samples
    until a window reaches the end; the last one ends at the end (``n - chunk``, or 0 for
    a track shorter than a chunk)."""
    starts: list[int] = []
    for offset in range(0, n, step):
        if offset + chunk >= n:
            tail = max(n - chunk, 0)
            if not starts or starts[-1] != tail:
                starts.append(tail)
            break
        starts.append(offset)
    return starts


class _Accumulator:
    """Weighted overlap-add into a rolling buffer: ``add`` a window's output times its
    weights at ``start``; ``release(upto)`` divides ``[base, upto)`` by the summed weights
    and hands it on (nothing later adds there: windows come in ascending order)."""

    def __init__(self, stems: int, channels: int, chunk: int, batch: int, step: int, emit):
        import torch

        capacity = chunk + batch * step + chunk
        self.out = torch.zeros(stems, channels, capacity)
        self.weight = torch.zeros(capacity)
        self.base = 0
        self.emit = emit

    def add(self, start: int, part, weights) -> None:
        a = start - self.base
        b = a + part.shape[-1]
        if a < 0 or b > self.out.shape[-1]:
            raise RuntimeError(f"window at {start} outside the buffer at {self.base}")
        self.out[..., a:b] += part * weights
        self.weight[a:b] += weights

    def release(self, upto: int) -> None:
        k = upto - self.base
        if k <= 0:
            return
        done = self.out[..., :k] / self.weight[:k].clamp(min=1e-10)
        self.emit(self.base, done)
        keep = self.out.shape[-1] - k
        self.out[..., :keep] = self.out[..., k:].clone()
        self.out[..., keep:] = 0
        self.weight[:keep] = self.weight[k:].clone()
        self.weight[keep:] = 0
        self.base = upto


def load(ckpt: Path | str, yaml_path: Path | str, device: str = "cpu", *,
         name: str | None = None, sha256: str | None = None) -> RoformerModel:
    """Read the config, build the network and load the checkpoint with ``strict=True``.
    Raises ``RoformerConfigError`` (the config: unsupported architecture or option) or
    ``RoformerError`` (the checkpoint: unreadable, keys or shapes that do not match the
    config), each one line naming the file. ``sha256``: the checkpoint's, when known."""
    ckpt, yaml_path = Path(ckpt), Path(yaml_path)
    start = time.perf_counter()
    config = read_config(yaml_path)
    if not ckpt.is_file():
        raise RoformerError(f"{ckpt}: no such checkpoint")
    # built without storage, then the checkpoint's own tensors become the parameters
    # (assign=True; shapes are still checked, strictly): the weights are in memory once
    # while loading, not twice (a random init, then the copy), and no time goes to an init
    net = build_net(config, "meta")
    state = read_state_dict(ckpt)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise RoformerError(f"{ckpt}: does not match {yaml_path.name} "
                            f"({config.architecture}): {_mismatch(exc)}") from None
    del state
    net.float()  # a half-precision checkpoint runs as fp32 (autocast decides, per window)
    net.eval()
    net.to(device)
    net.prepare()  # the fused weights (imaker/roformer/net.py), built once here
    release_freed_memory()  # what loading freed (the checkpoint's replaced tensors)
    digest = sha256 or file_sha256(ckpt)
    return RoformerModel(name=name or ckpt.stem, config=config, net=net, device=str(device),
                         sha256=digest, ckpt=ckpt, load_seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class Installed:
    """A RoFormer model found in a model folder (``scan``), its config read, weights not."""

    name: str
    ckpt: Path
    yaml: Path
    size_bytes: int
    architecture: str | None  # None when the config cannot be used
    stems: tuple[str, ...]
    error: str | None         # the one-line reason when the config cannot be used


def scan(repo: Path | str) -> list[Installed]:
    """The ``<name>.ckpt`` + ``<name>.yaml`` pairs in ``repo``, sorted by name, with what
    their configs say (no weights are loaded: ``load`` checks those)."""
    repo = Path(repo)
    if not repo.is_dir():
        return []
    found = []
    for ckpt in sorted(repo.glob("*.ckpt")):
        yaml_path = ckpt.with_suffix(".yaml")
        if not yaml_path.is_file():
            continue
        try:
            config = read_config(yaml_path)
            arch, stems, error = config.architecture, config.stems, None
        except RoformerConfigError as exc:
            arch, stems, error = None, (), str(exc)
        found.append(Installed(ckpt.stem, ckpt, yaml_path, ckpt.stat().st_size, arch, stems,
                               error))
    return found
