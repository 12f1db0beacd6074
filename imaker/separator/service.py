"""The separation service (``imaker separator serve``).

    GET  /health      {"status": "ok", "version", "identity", "fingerprint", "pid", "active",
                       "concurrency", "models", ...}
    POST /separate    {"job_id", "source", "stems_dir", "separation": {...}}
                      -> NDJSON lines: {"event": "accepted"|"waiting"|"progress"|"done"|"error"}

A request names the stored source (``library/<job_id>/source.flac``) and the stems folder
(``stems/<job_id>/``) — paths this process sees at the same place as the run (one host,
or the same volumes in compose); the stems are streamed to disk there as the windows
finish (``imaker.pipeline.separate_to_folder``) and the last line carries ``stems.json``.

Models are loaded once per (name, repo, device) and kept. At most ``concurrency``
separations run at once (an anyio ``CapacityLimiter``; the rest wait): on the CPU that is
the number of cores, and each separation takes ``cores // running`` torch threads before
every forward pass (two single-threaded separations do ~20 % more work per second on 2
cores than one two-threaded one) — except with the OpenVINO backend (``DEMUCS_BACKEND``),
which runs one separation at a time on all cores (1 x 2 threads did 1.7x the work of 2 x 1
on 2 cores: benchmarks/RESULTS.md). On CUDA the windows of the separations running at once
share forward passes (``fast_apply.WindowBatcher``, one per model, demucs and RoFormer
alike: one batch of every separation per pass), and as many separations run as fit a
device-memory budget (``admission``: 0.8 of the memory free once the model is loaded,
divided by what one separation's windows were measured to take in a pass); 2 until the
first pass was measured (``serve --preload`` measures it before the service answers).
``SEPARATOR_CONCURRENCY`` fixes the number instead.
A client that goes away (its run was killed) stops its separation at the next window.
``identity`` (``client.identity``: version, code hash, Python environment, model repo) tells
a loopback client whether this service is its checkout's (see ``imaker.separator.client``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .. import pipeline, separation, stemset
from ..settings import Separation
from . import admission

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
#: separations at once on CUDA until a pass was measured (then: ``admission.admitted``)
CUDA_CONCURRENCY = admission.UNMEASURED
#: windows per shared forward pass until a pass was measured (2 tracks x the default CUDA
#: batch of 8; then one batch of every admitted separation: ``admission.windows_per_pass``)
CROSS_BATCH_ITEMS = 16


class SeparateRequest(BaseModel):
    """A separation: the stored source, the stems folder, and the run's ``separation``
    settings group (``imaker.settings.Separation``: model, repo, device, windowing,
    precision, backend) as it is, so a setting added there reaches the service as is."""
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=128)
    source: str
    stems_dir: str
    separation: Separation = Field(default_factory=Separation)
    #: the variants the track makes (they choose the models: ``stemset.plan``); None: all
    variants: list[str] | None = None


class Preload(BaseModel):
    """What ``serve --preload`` readies before the service answers: the models the
    settings' tracks use (``stemset.plan`` of ``separation`` for ``variants``: the variants
    every track makes, None = all), each loaded and kept, and the 4-stem model's converted
    backend converted and compiled (on CUDA: the model run on one 60 s separation, the
    pass the memory admission measures)."""
    model_config = ConfigDict(extra="forbid")
    separation: Separation = Field(default_factory=Separation)
    variants: list[str] | None = None


class Cancelled(Exception):
    pass


class _Separator:
    """What ``pipeline.separate_to_folder`` expects, for one request: the plan of models
    (``stemset.plan``), each family loaded once per process and run its own way."""

    def __init__(self, service: "Service", req: SeparateRequest, cancel: threading.Event):
        self.service, self.req, self.cancel = service, req, cancel
        o = req.separation
        self.segment, self.overlap, self.shifts = o.segment, o.overlap, o.shifts
        self.plan = stemset.plan(o, req.variants)
        repo = str(o.model_repo) if o.model_repo else None
        #: what this separation may load: the service keeps these loaded while it runs
        self.models = [(name, repo) for name in self.plan.models]

    def load(self, name: str | None = None):
        o = self.req.separation
        return stemset.load(name or o.model, o.model_repo, o.device)

    def key(self, loaded) -> dict:
        return stemset.key(loaded, self.req.separation)

    def autocast(self, loaded) -> str | None:
        """The autocast dtype of the network (None: fp32), for both families:
        ``DEMUCS_AUTOCAST`` on CUDA, ``DEMUCS_CPU_AUTOCAST`` on the CPU."""
        o = self.req.separation
        if stemset.is_roformer_model(loaded):
            return separation.roformer_autocast(loaded.device, o.autocast, o.cpu_autocast)
        _, dtype = separation.inference_plan(loaded.device, o.batch_size, o.autocast,
                                             o.cpu_autocast)
        return dtype

    def precision(self, loaded) -> str:
        return self.autocast(loaded) or "fp32"

    def describe(self, loaded) -> dict:
        return stemset.describe(loaded, self.precision(loaded))

    def threads(self) -> int:
        if self.cancel.is_set():
            raise Cancelled("the client went away")
        return max(1, self.service.cores // max(1, self.service.active))

    def separate(self, loaded, wav, *, sink=None, inplace=False):
        o = self.req.separation
        if stemset.is_roformer_model(loaded):
            # chunked overlap-add with the config's chunk size and overlap, streamed to
            # the sink (bounded memory), the CPU threads split like demucs', on CUDA the
            # windows of concurrent separations in shared passes like demucs'
            stemset.roformer_backend(o.backend, loaded)
            return loaded.separate(wav, sink=sink, threads=self.threads,
                                   autocast=self.autocast(loaded),
                                   batcher=self.service.batcher_for(loaded))
        return separation.separate(loaded, wav, segment=o.segment, overlap=o.overlap,
                                   shifts=o.shifts, batch_size=o.batch_size,
                                   autocast=o.autocast, sink=sink, inplace=inplace,
                                   threads=self.threads, cpu_autocast=o.cpu_autocast,
                                   batcher=self.service.batcher_for(loaded),
                                   backend=o.backend)


class Service:
    def __init__(self, concurrency: int | None = None, idle_exit_s: float | None = None,
                 preload: Preload | None = None, cross_batch: bool = False,
                 identity: dict | None = None):
        self.cores = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else (os.cpu_count() or 1))
        #: SEPARATOR_CONCURRENCY (or --concurrency) given: a fixed number, never re-admitted
        self.fixed = bool(concurrency)
        self.concurrency = concurrency or self._auto_concurrency()
        self.limiter = anyio.CapacityLimiter(self.concurrency)
        self.pass_windows = CROSS_BATCH_ITEMS  # the batchers' pass size (``_readmit``)
        self.gpu: dict | None = None  # the CUDA admission's figures, for /health
        self.active = 0  # separations running now (under the limiter)
        self.completed = 0  # separations finished since the start
        self.batchers: dict = {}
        #: (model name, repo) -> separations running now whose plan names it
        self.in_use: collections.Counter = collections.Counter()
        self.cross_batch = cross_batch
        self._lock = threading.Lock()
        self.idle_exit_s = idle_exit_s
        self.last_used = time.monotonic()
        self.preload = preload
        self.server = None  # the uvicorn server (for the idle exit)
        self.started_at = time.time()
        self.identity = identity

    def _auto_concurrency(self) -> int:
        try:
            import torch

            if torch.cuda.is_available():
                return CUDA_CONCURRENCY
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        from .. import backends
        from ..settings import SettingsError, load_settings

        try:
            setting = load_settings().separation.backend
        except SettingsError:
            setting = "auto"
        if backends.cpu_runs_one_at_a_time(setting):
            return 1
        return self.cores

    def _release_unused(self) -> None:
        """Under ``_lock``, as a separation starts: drop the loaded models that no running
        separation plans (the settings switched to another model) and their batchers."""
        dropped = set(stemset.release_except(self.in_use))
        if dropped:
            log.info("released models no running separation uses: %s", ", ".join(sorted(dropped)))
            self.batchers = {k: b for k, b in self.batchers.items() if k[1] not in dropped}

    def batcher_for(self, loaded):
        """On CUDA (or when ``cross_batch`` is forced), one ``WindowBatcher`` per model (a
        demucs ``separation.LoadedModel`` or a ``RoformerModel``: both have a name, a
        signature and a device): the windows of the separations running at once share
        forward passes. On the CPU the separations split the cores instead (one thread
        each beats one big batch there)."""
        if not (self.cross_batch or str(loaded.device).startswith("cuda")):
            return None
        from ..fast_apply import WindowBatcher

        with self._lock:
            key = (type(loaded).__name__, loaded.name, loaded.signature, str(loaded.device))
            if key not in self.batchers:
                self.batchers[key] = WindowBatcher(max_items=self.pass_windows)
            return self.batchers[key]

    def _readmit(self) -> None:
        """On CUDA (``concurrency`` not fixed), once a batcher measured a pass: admit as many
        separations as fit the memory budget (``admission``) and let the passes take one
        batch from each. Called in the event loop (the limiter's thread) when a request
        arrives and when a separation ends; raising the limit admits waiting requests,
        lowering it lets the running ones finish."""
        measured = [b for b in list(self.batchers.values())
                    if b.pass_bytes_per_window and b.device_free is not None]
        if self.fixed or not measured:
            return
        # the heaviest model's windows (a separation may run several models in turn) and
        # the smallest budget seen (the first pass of each model, its weights loaded)
        footprint = admission.Footprint(
            pass_bytes_per_window=max(b.pass_bytes_per_window for b in measured),
            input_bytes_per_window=max(b.input_bytes_per_window for b in measured),
            windows_per_call=max(b.windows_per_call for b in measured))
        budget = min(admission.budget(*b.device_free) for b in measured)
        n = admission.admitted(budget, footprint)
        self.pass_windows = admission.windows_per_pass(n, footprint, CROSS_BATCH_ITEMS)
        for b in list(self.batchers.values()):
            b.max_items = self.pass_windows
        if n != self.concurrency:
            log.info("CUDA admission: %d separations at once (budget %.1f GiB, %.0f MiB each)",
                     n, budget / 2**30, footprint.per_separation / 2**20)
        self.concurrency = n
        self.limiter.total_tokens = n
        self.gpu = {"budget_bytes": budget, "per_separation_bytes": footprint.per_separation,
                    "pass_bytes_per_window": footprint.pass_bytes_per_window,
                    "input_bytes_per_window": footprint.input_bytes_per_window,
                    "windows_per_call": footprint.windows_per_call,
                    "windows_per_pass": self.pass_windows, "admitted": n}

    # ----- endpoints ---------------------------------------------------------------------
    async def health(self, request: Request) -> JSONResponse:
        from importlib.metadata import version

        from .client import fingerprint

        return JSONResponse({
            "status": "ok", "version": version("instrumental-maker"), "pid": os.getpid(),
            "identity": self.identity,
            "fingerprint": fingerprint(self.identity) if self.identity else None,
            "active": self.active, "completed": self.completed,
            "concurrency": self.concurrency, "cores": self.cores,
            # on CUDA once a pass was measured: the memory budget and what it admits
            "gpu_admission": self.gpu,
            "models": [{"name": m.name, "device": str(m.device), "signature": m.signature}
                       for m in stemset.loaded_models()],
            "shared_passes": sum(b.merged for b in self.batchers.values()),
            # converted-backend engines compiled so far (a preloaded service compiles
            # before it answers, not in the first track)
            "compiles": getattr(sys.modules.get("imaker.backends"), "compiles", 0)})

    async def separate(self, request: Request):
        try:
            req = SeparateRequest.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            return JSONResponse({"event": "error", "kind": "bad_request",
                                 "message": f"invalid request: {exc}"}, status_code=400)
        source = Path(req.source)
        if not source.is_file():
            return JSONResponse({"event": "error", "kind": "bad_request",
                                 "message": f"{source} does not exist on the separation "
                                            "service's host (same volumes as the runs?)"},
                                status_code=400)
        self.last_used = time.monotonic()
        return StreamingResponse(self._stream(req), media_type="application/x-ndjson")

    async def _stream(self, req: SeparateRequest):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        state = {"fraction": 0.0}

        def progress(fraction: float) -> None:
            state["fraction"] = fraction

        def work() -> dict:
            separator = _Separator(self, req, cancel)
            with self._lock:
                self.active += 1
                self.in_use.update(separator.models)
                self._release_unused()
            try:
                meta = pipeline.separate_to_folder(Path(req.source), Path(req.stems_dir),
                                                   req.job_id, separator, progress)
                with self._lock:
                    self.completed += 1
                return meta
            finally:
                with self._lock:
                    self.active -= 1
                    self.in_use.subtract(separator.models)
                    self.in_use = +self.in_use  # drop the zero counts
                self.last_used = time.monotonic()

        async def run() -> None:
            self._readmit()
            try:
                meta = await anyio.to_thread.run_sync(work, limiter=self.limiter)
                await events.put({"event": "done", "stems": meta})
            except Exception as exc:  # noqa: BLE001 - reported to the client as one line
                await events.put({"event": "error", "kind": "failed",
                                  "message": pipeline.describe_error(exc)})
            finally:
                self._readmit()  # the first passes were measured meanwhile

        task = loop.create_task(run())
        try:
            yield _line({"event": "accepted", "job_id": req.job_id, "pid": os.getpid()})
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    running = self.active > 0
                    yield _line({"event": "progress" if running else "waiting",
                                 "fraction": round(state["fraction"], 4)})
                    continue
                yield _line(event)
                return
        finally:
            # the client went away (or we are done): stop the separation at its next window
            cancel.set()
            if not task.done():
                await asyncio.shield(asyncio.wait([task]))

    async def _idle_watch(self) -> None:
        while self.idle_exit_s:
            await asyncio.sleep(min(5.0, self.idle_exit_s))
            if self.active == 0 and time.monotonic() - self.last_used > self.idle_exit_s:
                if self.server is not None:
                    self.server.should_exit = True
                return

    async def _startup(self) -> None:
        if self.preload is not None:
            await anyio.to_thread.run_sync(self._warm_up, self.preload)
            self._readmit()
        if self.idle_exit_s:
            asyncio.get_running_loop().create_task(self._idle_watch())

    def _warm_up(self, preload: Preload) -> None:
        o = preload.separation
        try:
            p = stemset.plan(o, preload.variants)
        except stemset.PlanError as exc:  # the first track's `stems` step reports it
            log.warning("nothing preloaded: %s", exc)
            return
        for name in p.instrumental:  # loaded once and kept, like demucs below
            try:
                stemset.load(name, o.model_repo, o.device)
            except Exception as exc:  # noqa: BLE001 - the first separation reports it
                log.warning("preloading %s failed: %s", name, exc)
        if p.demucs is None:  # no variant of these settings needs the 4-stem model
            return
        try:
            loaded = separation.load_model(p.demucs, o.model_repo, o.device)
        except Exception as exc:  # noqa: BLE001 - the first separation reports it
            log.warning("preloading %s failed: %s", p.demucs, exc)
            return
        if not str(loaded.device).startswith("cuda"):
            # the converted backend the first track runs is compiled now (OpenVINO from its
            # blob cache: 0.6 s for htdemucs on 2 cores), not in that track's `stems` step;
            # nothing more (a warm-up separation would add a window of inference)
            try:
                separation.prepare_backend(
                    loaded, threads=self.cores,  # as a track alone: cores // active
                    batch_size=o.batch_size, autocast=o.autocast,
                    cpu_autocast=o.cpu_autocast, backend=o.backend)
            except Exception as exc:  # noqa: BLE001 - the first separation reports it
                log.warning("preparing %s's backend failed: %s: %s", p.demucs,
                            type(exc).__name__, exc)
            return
        # On CUDA 60 s of noise through the path the first track takes: a full batch of 8
        # windows (7.8 s, overlap 0.25: 48.8 s), so the pass measured for the admission
        # (``_readmit``) is the size the tracks' passes start from
        noise = np.random.default_rng(0).standard_normal((loaded.channels, 60 * loaded.samplerate))
        try:
            separation.separate(loaded, (0.1 * noise).astype(np.float32), segment=o.segment,
                                overlap=o.overlap, shifts=0, batch_size=o.batch_size,
                                autocast=o.autocast, cpu_autocast=o.cpu_autocast,
                                # the model's batcher: its pass is measured, and the
                                # first request is admitted by memory (``_readmit``)
                                batcher=self.batcher_for(loaded), backend=o.backend)
        except Exception as exc:  # noqa: BLE001 - a warm-up: the first separation reports it
            log.warning("warm-up separation failed: %s: %s", type(exc).__name__, exc)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        await self._startup()
        yield

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/health", self.health, methods=["GET"]),
                                 Route("/separate", self.separate, methods=["POST"])],
                         lifespan=self._lifespan)


def _line(event: dict[str, Any]) -> bytes:
    return (json.dumps(event) + "\n").encode()


def serve(host: str, port: int, *, concurrency: int | None = None,
          idle_exit_s: float | None = None, preload: Preload | None = None,
          identity: dict | None = None, on_listening=None) -> None:
    """Run the service until SIGINT/SIGTERM (or the idle exit). ``on_listening()`` is called
    once it accepts connections (after the preload)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_listening is not None:
                on_listening()

    service = Service(concurrency, idle_exit_s, preload, identity=identity)
    config = uvicorn.Config(service.app(), host=host, port=port, log_level="info",
                            access_log=False, timeout_graceful_shutdown=5)
    server = Server(config)
    service.server = server
    server.run()
