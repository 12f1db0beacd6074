"""Demucs source separation, with the model loaded once per process (no Dagster)."""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

_CACHE: dict[tuple[str, str | None, str], "LoadedModel"] = {}
_LOCK = threading.Lock()


class SeparationError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str
    signature: str
    device: str
    model: object = field(repr=False)
    samplerate: int = 44100
    channels: int = 2
    sources: tuple[str, ...] = ()
    load_seconds: float = 0.0
    repo: Path | None = None  # the local model repo (converted backends cache there)


def resolve_device(spec: str) -> str:
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise SeparationError(f"DEMUCS_DEVICE={spec} but no CUDA device is available")
    return spec


def _signature(name: str, repo: Path | None, model) -> str:
    """The model's signature(s): from the bag's YAML in a local repo, else a hash of
    the weights (computed once per load)."""
    if repo is not None:
        bag = repo / f"{name}.yaml"
        if bag.is_file():
            import yaml

            sigs = (yaml.safe_load(bag.read_text()) or {}).get("models") or []
            if sigs:
                return "+".join(str(s) for s in sigs)
        return name
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:8]


def load_model(name: str, repo: Path | None = None, device: str = "auto") -> LoadedModel:
    """Load a demucs model (bag) through ``demucs.pretrained.get_model``; cached per process."""
    if repo is not None and Path(repo, f"{name}.oracle.json").is_file():
        from .oracle import load_oracle  # benchmark/test-only model: imaker/oracle.py

        return load_oracle(name, Path(repo))
    device = resolve_device(device)
    key = (name, str(repo) if repo else None, device)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        from demucs.pretrained import ModelLoadingError, get_model

        if repo is not None:  # weights missing: say so at once (no download attempts)
            from .models import missing

            why = missing(name, Path(repo))
            if why is not None:
                raise SeparationError(why)
        start = time.perf_counter()
        try:
            model = get_model(name, repo=Path(repo) if repo else None)
        except ModelLoadingError as exc:
            where = f"model repo {repo}" if repo else "the model hub/cache"
            raise SeparationError(f"cannot load demucs model {name!r} from {where}: {exc}") from None
        except SystemExit as exc:  # demucs calls fatal() -> sys.exit for a missing repo
            raise SeparationError(f"cannot load demucs model {name!r}: {exc}") from None
        model.to(device)
        model.eval()
        loaded = LoadedModel(name=name, signature=_signature(name, repo, model), device=device,
                             model=model, samplerate=int(model.samplerate),
                             channels=int(model.audio_channels), sources=tuple(model.sources),
                             load_seconds=time.perf_counter() - start,
                             repo=Path(repo) if repo else None)
        _CACHE[key] = loaded
        return loaded


def _set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


DEFAULT_CUDA_BATCH_SIZE = 8
DEFAULT_CPU_BATCH_SIZE = 1


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX-BF16 or AVX512-BF16, from
    /proc/cpuinfo). Without it torch emulates bf16 on the CPU, which is slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def inference_plan(device: str, batch_size: int | None, autocast: bool,
                   cpu_autocast: bool | None = False) -> tuple[int, str | None]:
    """``(batch_size, autocast dtype)`` for ``separate``; batch 0 means demucs' own
    ``apply_model``. ``batch_size=None`` (auto) picks our segment loop everywhere:
    ``DEFAULT_CUDA_BATCH_SIZE`` segments per pass on CUDA, 1 elsewhere — on 2 CPU cores
    batches > 1 were slower per segment, while batch 1 ran as fast as ``apply_model`` with
    about half its peak RSS on a 20-minute track (benchmarks/RESULTS.md). bf16 autocast is
    used on CUDA when ``autocast``, and on the CPU when ``cpu_autocast`` — ``None`` (auto,
    the setting's default) meaning "when the CPU has native bf16" (AMX / AVX512-BF16:
    separation ~1.4x faster there, at 42-53 dB SNR against fp32, within the 40 dB quality
    bar of the fast path; elsewhere bf16 is emulated and slower, so fp32)."""
    cuda = str(device).startswith("cuda")
    if batch_size is None:
        batch_size = DEFAULT_CUDA_BATCH_SIZE if cuda else DEFAULT_CPU_BATCH_SIZE
    if batch_size < 0:
        raise SeparationError(f"batch_size must be >= 0, got {batch_size}")
    if cpu_autocast is None:
        cpu_autocast = cpu_has_native_bf16()
    wanted = (autocast and cuda) or (cpu_autocast and str(device) == "cpu")
    return batch_size, ("bf16" if wanted and batch_size > 0 else None)


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16 tile units (Sapphire Rapids and later Xeons)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def roformer_autocast(device: str, autocast: bool, cpu_autocast: bool | None) -> str | None:
    """The autocast dtype of a RoFormer network (``imaker.roformer``), by the same settings
    as demucs' (``inference_plan``): bf16 on CUDA when ``autocast`` (``DEMUCS_AUTOCAST``), on
    the CPU when ``cpu_autocast`` (``DEMUCS_CPU_AUTOCAST``). Its ``auto`` (None) is narrower
    than demucs': bf16 only where the CPU has AMX-BF16 — measured there ~2x faster than fp32
    at >= 40 dB SNR against the fp32 reference (benchmarks/RESULTS.md, issue 21); on a CPU
    with AVX512-BF16 but no AMX, bf16 RoFormer ran slower than fp32 (docs/roformer.md), so
    fp32. The band split, STFT, masking, iSTFT and overlap-add stay fp32 under autocast."""
    if cpu_autocast is None and str(device) == "cpu":
        cpu_autocast = cpu_has_amx_bf16()
    return inference_plan(device, 1, autocast, cpu_autocast)[1]


def _mono_stats(mix, chunk: int = 1 << 20):
    """Mean and (unbiased) standard deviation of the mono mix ``mix.mean(0)``, as float32
    0-d tensors like demucs' ``ref.mean()``/``ref.std()``, computed chunk by chunk in
    float64 (no whole-track mono copy: 0.6 GB for a 1-hour track)."""
    import torch

    n = mix.shape[-1]
    total = torch.zeros((), dtype=torch.float64)
    for a in range(0, n, chunk):
        total += mix[:, a:a + chunk].mean(0, dtype=torch.float64).sum()
    mean = total / max(n, 1)
    sq = torch.zeros((), dtype=torch.float64)
    for a in range(0, n, chunk):
        sq += (mix[:, a:a + chunk].mean(0, dtype=torch.float64) - mean).square().sum()
    std = (sq / max(n - 1, 1)).sqrt()
    return mean.float(), std.float()


def _engine_plan(loaded: LoadedModel, batch_size: int | None, autocast: bool,
                 cpu_autocast: bool | None, backend: str | None):
    """``(batch, autocast dtype, runner_for)`` of a separation with these options: the
    one plan ``separate`` runs and ``prepare_backend`` makes ready. ``runner_for`` is the
    converted backend's (``backends.prepare``: converted once per model, cached), or None
    where torch runs the network (or demucs' ``apply_model``: batch 0); with a converted
    backend the dtype is None (it computes in its own precision)."""
    batch, autocast_dtype = inference_plan(loaded.device, batch_size, autocast, cpu_autocast)
    if not batch:
        return batch, autocast_dtype, None
    from imaker import backends

    runner_for = backends.prepare(backend, loaded.device, loaded.model, autocast_dtype,
                                  loaded.repo)
    return batch, (None if runner_for is not None else autocast_dtype), runner_for


def prepare_backend(loaded: LoadedModel, *, threads: int, batch_size: int | None = None,
                    autocast: bool = True, cpu_autocast: bool | None = False,
                    backend: str | None = "torch") -> bool:
    """Make ready now the converted backend that ``separate`` with these options would run
    (converted once per model if its cache lacks it, its engine compiled for ``threads``),
    without separating anything; False when there is none to make (torch runs the model, or
    demucs' ``apply_model``). What a CPU separation service does at start: a one-second
    warm-up separation cost a window of inference on top (htdemucs: 1.3 CPU-s in bf16, 2.6
    in fp32) for what the compile alone gives."""
    if getattr(loaded.model, "is_oracle", False):
        return False
    _, _, runner_for = _engine_plan(loaded, batch_size, autocast, cpu_autocast, backend)
    if runner_for is None:
        return False
    for sub in getattr(loaded.model, "models", None) or [loaded.model]:
        runner_for(sub).ready(threads)
    return True


def separate(loaded: LoadedModel, wav: np.ndarray, *, segment: float | None = None,
             overlap: float = 0.25, shifts: int = 1, batch_size: int | None = None,
             autocast: bool = True, sink=None, inplace: bool = False,
             threads: Callable[[], int] | None = None, cpu_autocast: bool | None = False,
             batcher=None, backend: str | None = "torch"
             ) -> dict[str, np.ndarray] | None:
    """Separate ``wav`` (channels, samples at the model's rate) into ``{source: array}``.

    Same normalisation as ``demucs.separate`` (zero mean, unit std of the mono mix), then
    the model over segments with the given segment/overlap/shifts: ``batch_size`` segments
    per forward pass through ``imaker.fast_apply.apply_model_batched`` (same windows and
    overlap-add as demucs), or ``demucs.apply.apply_model`` when ``batch_size`` is 0;
    ``None`` chooses per device (see ``inference_plan``). ``autocast`` allows bf16 autocast
    on CUDA (spectrograms stay fp32), ``cpu_autocast`` on the CPU (None: when native).

    ``sink(start, chunk)`` streams the result instead of returning it: ``chunk`` is a float32
    ``(sources, channels, n)`` array for samples ``start .. start + n`` (valid during the
    call only), in order; with one model and ``shifts <= 1`` the stems never exist whole in
    memory. ``inplace=True`` lets the normalisation overwrite ``wav`` (float32, C-contiguous)
    instead of copying it. ``threads``: called before each forward pass on the CPU, the
    number of torch threads for the calling thread (the separation service splits the
    cores between the separations it runs at once). ``backend`` (``DEMUCS_BACKEND``:
    auto, torch, onnx, openvino) runs the network of our segment loop on a converted
    graph on the CPU in fp32 (``imaker.backends.choose``; converted once, cached beside
    the model repo); it does not apply to demucs' ``apply_model`` (batch 0)."""
    if getattr(loaded.model, "is_oracle", False):  # imaker/oracle.py: a song's known stems
        return loaded.model.separate(wav, sink=sink)
    import torch

    if wav.ndim != 2 or wav.shape[0] != loaded.channels:
        raise SeparationError(f"expected {loaded.channels} channels, got shape {wav.shape}")
    batch, autocast_dtype, runner_for = _engine_plan(loaded, batch_size, autocast,
                                                     cpu_autocast, backend)
    mix = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    mean, std = _mono_stats(mix)
    if not torch.isfinite(std) or float(std) < 1e-8:
        zeros = np.zeros((len(loaded.sources), *wav.shape), dtype=np.float32)
        if sink is not None:
            sink(0, zeros)
            return None
        return {name: zeros[i] for i, name in enumerate(loaded.sources)}
    if inplace and mix.data_ptr() == wav.__array_interface__["data"][0]:
        mix.sub_(mean).div_(std)
    else:
        mix = (mix - mean).div_(std)  # one copy: `wav` may share memory with `mix`

    def denormalised(start: int, chunk) -> None:
        sink(start, (chunk * std + mean).to("cpu").numpy())

    threads = threads if batch and str(loaded.device) == "cpu" else None
    with torch.inference_mode():
        if batch:
            from imaker import fast_apply

            out = fast_apply.apply_model_batched(
                loaded.model, mix[None], shifts=shifts, overlap=overlap, segment=segment,
                batch_size=batch, device=loaded.device, autocast_dtype=autocast_dtype,
                on_batch=(lambda: _set_threads(threads())) if threads else None,
                batcher=batcher, runner_for=runner_for,
                sink=(lambda start, chunk: denormalised(start, chunk[0])) if sink else None)
            if sink is not None:
                return None
            out = out[0]
            out.mul_(std).add_(mean)
        else:
            from demucs.apply import apply_model

            out = apply_model(loaded.model, mix[None], device=loaded.device, shifts=shifts,
                              split=True, overlap=overlap, segment=segment, progress=False)[0]
            out = out * std + mean
    out = out.to("cpu").numpy().astype(np.float32, copy=False)
    if sink is not None:
        sink(0, out)
        return None
    return {name: out[i] for i, name in enumerate(loaded.sources)}

