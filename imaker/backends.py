"""CPU inference backends for HTDemucs windows (no Dagster).

``DEMUCS_BACKEND`` picks what runs the network of each window in our segment loop
(``imaker.fast_apply``): ``torch`` (PyTorch eager, the model itself), ``onnx`` (ONNX
Runtime) or ``openvino`` (OpenVINO, the same ONNX file), or ``auto``. The STFT, masking and
iSTFT stay in torch (``imaker.htcore.split_forward``); only the real-valued core network
(``htcore.HTCore``) is converted, once per model, at the model's training segment length
(our windows always have it), and cached beside the model repo:

    <repo>/.imaker-cache/<key>-<samples>.onnx

``<key>`` hashes the model's class, constructor arguments, weights and segment, so any
change to the model (new weights under the same name, another segment) converts anew, and
every model a repo holds (each member of a bag) gets its own file. Files are written to a
temporary name and renamed, so a crash or a concurrent conversion never leaves a partial
file under the final name. OpenVINO additionally keeps its compiled blobs in
``<repo>/.imaker-cache/openvino/`` (its own ``CACHE_DIR`` mechanism).

Precision: fp32 everywhere (``INFERENCE_PRECISION_HINT=f32`` for OpenVINO, which would
otherwise pick bf16 on CPUs that have it), except where our settings ask for bf16 on the
CPU (``DEMUCS_CPU_AUTOCAST``, auto = the CPU has native bf16): OpenVINO then computes in
bf16 itself (AMX), the other converted backends do not apply and torch autocast runs.

Threads: the calling thread's ``torch.get_num_threads()`` at the time of the call (the
separation service sets it before every window) is the number of threads the backend
uses for that window: one ONNX Runtime session / OpenVINO compiled model per thread count.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import threading
import time
import typing as tp
import weakref
from pathlib import Path

import numpy as np
import torch

from . import htcore
from .settings import BACKENDS  # the one declaration: DEMUCS_BACKEND's type

log = logging.getLogger(__name__)

#: what ``auto`` picks on the CPU (fp32 path) when it is installed (benchmarks/RESULTS.md)
AUTO_ORDER = ("openvino", "onnx")
CACHE_DIRNAME = ".imaker-cache"
#: bump when the exported graph changes for the same model (invalidates every cache file)
EXPORT_VERSION = 1
OPSET = 17

conversions = 0  # models converted by this process (tests, logs)
compiles = 0  # engines made ready (ORT sessions, OpenVINO compiles, AOTI loads) by this process
_LOCK = threading.Lock()
_RUNNERS: dict[tuple[str, str, int], "CoreRunner"] = {}
_KEYS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


class BackendError(RuntimeError):
    pass


def available(backend: str) -> bool:
    """Whether the packages a backend needs are importable (``onnx`` converts the model)."""
    import importlib.util

    pkgs = {"torch": ("torch",), "aoti": ("torch",), "onnx": ("onnxruntime", "onnx"),
            "openvino": ("openvino", "onnx")}.get(backend)
    return pkgs is not None and all(importlib.util.find_spec(p) is not None for p in pkgs)


def supported(model) -> bool:
    """Whether every model of ``model`` (a bag or one model) can run on a converted core."""
    members = getattr(model, "models", None) or [model]
    try:
        for sub in members:
            htcore.check_supported(sub)
    except ValueError:
        return False
    return True


def cpu_runs_one_at_a_time(setting: str | None) -> bool:
    """Whether CPU separations should run one at a time with all cores (the separation
    service's default concurrency): yes where OpenVINO will run them — measured on 2 cores,
    one separation with 2 threads did 1.7x the work of two with 1 thread each, while
    PyTorch eager is the other way round (+20 % for 2 x 1)."""
    setting = (setting or "auto").lower()
    return setting in ("auto", "openvino") and available("openvino")


def _is_bf16(autocast_dtype) -> bool:
    return autocast_dtype is not None and str(autocast_dtype).lower() in (
        "bf16", "bfloat16", "torch.bfloat16")


def choose(setting: str | None, device: str, model, autocast_dtype) -> str:
    """The backend that will run: ``torch`` unless the setting (or ``auto``) names a
    converted backend and it applies — the CPU, an HTDemucs (bag), fp32; or bf16 autocast
    (the CPU has native bf16) for OpenVINO, which then computes in bf16 itself."""
    setting = (setting or "auto").lower()
    if setting not in BACKENDS:
        raise BackendError(f"DEMUCS_BACKEND={setting!r}: expected one of {', '.join(BACKENDS)}")
    if setting == "torch":
        return "torch"

    def applies(backend: str) -> bool:
        precision_ok = autocast_dtype is None or (backend == "openvino"
                                                  and _is_bf16(autocast_dtype))
        return str(device) == "cpu" and precision_ok and supported(model)

    if setting == "auto":
        return next((b for b in AUTO_ORDER if applies(b) and available(b)), "torch")
    if not available(setting):
        raise BackendError(f"DEMUCS_BACKEND={setting} needs the "
                           f"{'onnxruntime' if setting == 'onnx' else 'openvino'} package "
                           "(openvino and onnx are dependencies of instrumental-maker: re-run "
                           "scripts/setup.sh; onnx also needs `pip install onnxruntime`)")
    if not applies(setting):
        log.warning("DEMUCS_BACKEND=%s does not apply here (device %s, autocast %s, model "
                    "%s); using torch", setting, device, autocast_dtype, type(model).__name__)
        return "torch"
    return setting


# ----- the converted core, cached on disk ------------------------------------------------
def model_key(model) -> str:
    """A digest of what determines the converted graph: class, constructor arguments,
    segment, weights (and buffers), the exporter's version. Computed once per model object
    (weights loaded for inference are not changed in place)."""
    key = _KEYS.get(model)
    if key is None:
        key = _KEYS[model] = _model_key(model)
    return key


def _model_key(model) -> str:
    digest = hashlib.sha256()
    args, kwargs = getattr(model, "_init_args_kwargs", ((), {}))
    digest.update(repr((type(model).__qualname__, args, sorted(kwargs.items()),
                        str(model.segment), EXPORT_VERSION, OPSET,
                        torch.__version__.split("+")[0])).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_dir(repo: Path | None) -> Path:
    """``<repo>/.imaker-cache``; for hub models (no repo) beside torch hub's checkpoints.
    Where that folder cannot be written (a read-only model volume), the first writable of
    ``$XDG_CACHE_HOME`` (or ``~/.cache``) and the temp folder, under
    ``imaker/<repo folder name>-<digest of its path>``."""
    base = Path(repo) if repo is not None else Path(torch.hub.get_dir()) / "checkpoints"
    preferred = base / CACHE_DIRNAME
    if _writable(preferred):
        return preferred
    digest = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:12]
    for root in (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"),
                 Path(tempfile.gettempdir())):
        folder = root / "imaker" / f"{base.name}-{digest}"
        if _writable(folder):
            return folder
    return preferred


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)


def onnx_path(model, repo: Path | None) -> Path:
    return cache_dir(repo) / f"{model_key(model)}-{htcore.training_length(model)}.onnx"


def _convert(model, path: Path, what: str,
             write: tp.Callable[[torch.nn.Module, tuple, Path], None]) -> Path:
    """Convert ``HTCore(model)`` with ``write(core, sample inputs, temporary path)`` and
    rename the result to ``path`` (atomically: nothing half-written under that name)."""
    global conversions
    htcore.check_supported(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    mix = torch.zeros(1, model.audio_channels, htcore.training_length(model))
    mix[..., ::7] = 1.0  # not silent: the exporter runs the graph once
    padded, _, mag = htcore.core_inputs(model, mix)
    core = htcore.HTCore(model).eval()
    # the suffix stays last: torch's AOTInductor packager wants a .pt2 name
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.part{path.suffix}")
    start = time.perf_counter()
    state = random.getstate()  # tracing runs the forward, which draws from `random`
    try:
        with torch.inference_mode(False), torch.no_grad():
            write(core, (padded, mag), tmp)
        os.chmod(tmp, 0o644)  # other users (a container) read it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        random.setstate(state)
    conversions += 1
    log.info("%s %s to %s in %.1f s", what, type(model).__name__, path,
             time.perf_counter() - start)
    return path


def _write_onnx(core, inputs: tuple, tmp: Path) -> None:
    # nn.MultiheadAttention's fused inference kernel (aten::_native_multi_head_attention)
    # has no ONNX symbolic: trace the unfused path (same maths).
    import warnings

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(core, inputs, str(tmp), input_names=["mix", "mag"],
                              output_names=["x", "xt"], opset_version=OPSET,
                              dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _write_aoti(core, inputs: tuple, tmp: Path) -> None:
    program = torch.export.export(core, inputs)
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))


def export_onnx(model, path: Path) -> Path:
    """Export ``HTCore(model)`` to the ONNX file ``path``."""
    return _convert(model, path, "converted", _write_onnx)


def aoti_path(model, repo: Path | None) -> Path:
    return cache_dir(repo) / f"{model_key(model)}-{htcore.training_length(model)}.pt2"


def export_aoti(model, path: Path) -> Path:
    """Compile ``HTCore(model)`` ahead of time (``torch.export`` + AOTInductor) into the
    package ``path``."""
    return _convert(model, path, "compiled", _write_aoti)


def artifact_path(model, repo: Path | None, backend: str) -> Path:
    return aoti_path(model, repo) if backend == "aoti" else onnx_path(model, repo)


def ensure_artifact(model, repo: Path | None, backend: str) -> Path:
    """The cached conversion of ``model``'s core for ``backend``, converted if missing."""
    path = artifact_path(model, repo, backend)
    if not path.is_file():
        (export_aoti if backend == "aoti" else export_onnx)(model, path)
    return path


# ----- engines: run the core for one window -----------------------------------------------
_COUNT_LOCK = threading.Lock()


def _count_compile() -> None:
    global compiles
    with _COUNT_LOCK:  # not _LOCK: `runner` holds it while an AOTI engine loads
        compiles += 1


class _OrtEngine:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.ort, self.path = ort, path
        self.sessions: dict[int, tp.Any] = {}
        self.lock = threading.Lock()

    def _session(self, threads: int):
        with self.lock:
            sess = self.sessions.get(threads)
            if sess is None:
                opts = self.ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.inter_op_num_threads = 1
                opts.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
                # no busy-waiting between ops: the cores are shared with the other
                # separations and the pipeline's encoders
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                # without the arena the activations are freed (peak 2.6 vs 4.3 GiB growing)
                opts.enable_cpu_mem_arena = False
                sess = self.ort.InferenceSession(str(self.path), opts,
                                                 providers=["CPUExecutionProvider"])
                _count_compile()
                self.sessions[threads] = sess
            return sess

    def ready(self, threads: int) -> None:
        self._session(threads)

    def __call__(self, mix: np.ndarray, mag: np.ndarray, threads: int):
        x, xt = self._session(threads).run(None, {"mix": mix, "mag": mag})
        return x, xt


class _OvEngine:
    def __init__(self, path: Path, cache: Path, precision: str = "f32"):
        import openvino as ov

        self.core = ov.Core()
        # compiled blobs cached: a later start imports the blob instead of converting the
        # ONNX graph and compiling again (compile_model from the path, so OV can skip both)
        self.core.set_property({"CACHE_DIR": str(cache)})
        if precision == "bf16" and "BF16" not in self.core.get_property(
                "CPU", "OPTIMIZATION_CAPABILITIES"):
            precision = "f32"  # no native bf16 on this CPU: never emulate it
        self.path, self.precision = path, precision
        self.compiled: dict[int, tp.Any] = {}
        self.local = threading.local()
        self.lock = threading.Lock()

    def _compiled(self, threads: int):
        with self.lock:
            cm = self.compiled.get(threads)
            if cm is None:
                # explicit: on CPUs with native bf16 OpenVINO would pick bf16 by itself
                cm = self.core.compile_model(str(self.path), "CPU", {
                    "INFERENCE_PRECISION_HINT": self.precision,
                    "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                    # unpinned: pinned, two 1-thread compiled models (two separations of
                    # the service) shared one core (2 x 20 s: 21.0 s instead of ~12 s)
                    "ENABLE_CPU_PINNING": False})
                _count_compile()
                self.compiled[threads] = cm
            return cm

    def ready(self, threads: int) -> None:
        # compiled (from the blob cache: 0.8 CPU-s for htdemucs) without an inference; the
        # first inference then costs about 0.2 CPU-s more than the next ones
        self._compiled(threads)

    def __call__(self, mix: np.ndarray, mag: np.ndarray, threads: int):
        cm = self._compiled(threads)
        requests = self.local.__dict__.setdefault("requests", {})
        req = requests.get(threads)
        if req is None:
            req = requests[threads] = cm.create_infer_request()
        # start_async + wait: the GIL is released while it runs (concurrent separations)
        req.start_async({"mix": mix, "mag": mag}, share_inputs=True)
        req.wait()
        return (req.get_output_tensor(0).data.copy(), req.get_output_tensor(1).data.copy())


class _AotiEngine:
    def __init__(self, path: Path):
        self.fn = torch._inductor.aoti_load_package(str(path))
        _count_compile()

    def ready(self, threads: int) -> None:
        """Loaded (compiled ahead of time) when made."""

    def __call__(self, mix: np.ndarray, mag: np.ndarray, threads: int):
        torch.set_num_threads(threads)  # the compiled kernels use torch's OpenMP pool
        x, xt = self.fn(torch.from_numpy(mix), torch.from_numpy(mag))
        return x.numpy(), xt.numpy()


class CoreRunner:
    """A stand-in for one HTDemucs in ``fast_apply``: ``runner(batch)`` == ``model(batch)``
    (eval, fp32), with the core network run by ``backend``. It draws from ``random`` once
    per call like the model's forward does (so the shift offsets stay demucs')."""

    def __init__(self, model, backend: str, path: Path, precision: str = "f32"):
        self.model, self.backend, self.path = model, backend, path
        self.precision = precision
        if precision != "f32" and backend != "openvino":
            raise BackendError(f"{backend} runs in f32 only")
        if backend == "onnx":
            self.engine = _OrtEngine(path)
        elif backend == "openvino":
            self.engine = _OvEngine(path, path.parent / "openvino", precision)
        elif backend == "aoti":
            self.engine = _AotiEngine(path)
        else:
            raise BackendError(f"no converted engine for backend {backend!r}")

    def ready(self, threads: int) -> None:
        """Create the session / compile for ``threads`` now, without running it."""
        self.engine.ready(threads)

    def warm_up(self, threads: int | None = None) -> None:
        """Create the session / compile for ``threads`` now and run one zero window through
        it (the whole first-use cost, for benchmarks)."""
        n = self.model.audio_channels
        self(torch.zeros(1, n, htcore.training_length(self.model)), threads=threads,
             draw=False)

    def __call__(self, batch: torch.Tensor, *, threads: int | None = None,
                 draw: bool = True) -> torch.Tensor:
        threads = threads or torch.get_num_threads()
        outs = []
        for i in range(batch.shape[0]):
            def core(mix, mag):
                x, xt = self.engine(mix.detach().contiguous().numpy(),
                                    mag.detach().contiguous().numpy(), threads)
                return torch.from_numpy(x), torch.from_numpy(xt)

            outs.append(htcore.split_forward(self.model, batch[i:i + 1].float(), core,
                                             draw=draw and i == 0))
        return torch.cat(outs, 0)


def runner(model, backend: str, repo: Path | None, precision: str = "f32") -> CoreRunner:
    """The (cached per process) runner of one HTDemucs on ``backend``; converts on the
    first use of a model whose converted core is not in the cache folder yet."""
    path = artifact_path(model, repo, backend)
    key = (str(path), backend, precision, id(model))
    with _LOCK:
        run = _RUNNERS.get(key)
        if run is None or run.model is not model:
            ensure_artifact(model, repo, backend)
            run = _RUNNERS[key] = CoreRunner(model, backend, path, precision)
        return run


def forget(models) -> int:
    """Drop the runners (converted, compiled engines) of ``models`` (the networks of
    released models; a bag's members too): ``_RUNNERS`` holds each runner's model, so a
    model the separation service releases (``stemset.release_except``) would otherwise stay
    in memory with its engine for the life of the service. Returns how many were dropped."""
    ids = {id(sub) for m in models for sub in (getattr(m, "models", None) or [m])}
    with _LOCK:
        gone = [key for key, run in _RUNNERS.items() if id(run.model) in ids]
        for key in gone:
            del _RUNNERS[key]
    return len(gone)


def prepare(setting: str | None, device: str, model, autocast_dtype,
            repo: Path | None) -> tp.Callable[[tp.Any], CoreRunner] | None:
    """``choose`` the backend and make its runners for every model of ``model`` now
    (converting what the cache lacks); returns ``runner_for`` for
    ``fast_apply.apply_model_batched`` (None: torch itself). With ``auto``, a conversion or
    engine that fails falls back to torch (logged); a backend named explicitly raises.
    The caller then runs without autocast (a converted backend handles precision)."""
    backend = choose(setting, device, model, autocast_dtype)
    if backend == "torch":
        return None
    precision = "bf16" if _is_bf16(autocast_dtype) else "f32"
    try:
        runners = {id(sub): runner(sub, backend, repo, precision)
                   for sub in getattr(model, "models", None) or [model]}
    except Exception as exc:  # noqa: BLE001 - auto must never make a separation fail
        if (setting or "auto").lower() != "auto":
            raise BackendError(f"DEMUCS_BACKEND={backend}: {exc}") from exc
        log.warning("DEMUCS_BACKEND=auto: %s failed (%s: %s); using torch", backend,
                    type(exc).__name__, exc)
        return None
    return lambda sub: runners[id(sub)]
