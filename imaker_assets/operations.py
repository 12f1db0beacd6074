"""What the `imaker` commands do with Dagster: in-process runs against an instance."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import sys
from typing import Iterable, TextIO

from dagster import AssetSelection, DagsterInstance, materialize

from imaker import separation
from imaker.pipeline import Library
from imaker.queues import QueueStore
from imaker.settings import Settings
from imaker.variants import VARIANTS
from resources import build_resources

from .assets import manifest, stems, track_assets, variants
from .catalog import catalog
from .checks import track_checks
from .definitions import build_defs
from .nas import build_nas_copy
from .partitions import tracks
from .runtime import claim_alive

NAS_COPY_NO_RETRY = build_nas_copy(retry_policy=None)
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def refresh_catalog(instance: DagsterInstance, settings: Settings) -> bool:
    result = materialize([catalog], instance=instance, resources=build_resources(settings),
                         run_config=QUIET, raise_on_error=False)
    return result.success


def worker_count(settings: Settings, waiting: int) -> int:
    """Worker processes for ``ingest_once``: ``INGEST_WORKERS``, or auto = 2 on a host with
    at least 2 cores (1 otherwise), never more than the tracks waiting."""
    wanted = settings.ingest_workers
    if wanted is None:
        wanted = 2 if (os.cpu_count() or 1) >= 2 else 1
    return max(1, min(wanted, waiting))


def _run_track(instance: DagsterInstance, settings: Settings, job_def, job_id: str,
               queue: str, extra_tags: dict[str, str] | None = None) -> tuple[bool, str]:
    """One track: its own ``ingest_track`` run (lineage, metadata, checks), then its NAS copy
    in a run of its own. Returns (succeeded, the line to print)."""
    tags = {"imaker/job_id": job_id, "imaker/queue": queue, "imaker/trigger": "imaker-ingest",
            **(extra_tags or {})}
    result = job_def.execute_in_process(
        partition_key=job_id, instance=instance, raise_on_error=False, run_config=QUIET,
        asset_selection=[a.key for a in track_assets], tags=tags)
    if result.success:
        # NAS copy in its own run without the in-process retry sleeps: a NAS that is
        # down fails this job at once; the sensor path (daemon) keeps the retry policy.
        nas = materialize([NAS_COPY_NO_RETRY], partition_key=job_id, instance=instance,
                          resources=build_resources(settings), run_config=QUIET,
                          raise_on_error=False, tags=tags)
        if nas.success:
            return True, f"{job_id}: {settings.outputs_dir / job_id}"
        result = nas
    error = QueueStore.from_settings(settings).read_error(job_id)
    if error:
        reason = f"{error['stage']}: {error['error']}"
    else:
        events = [e for e in result.all_events if e.is_step_failure or e.is_failure]
        reason = events[0].message if events else "run failed"
    return False, f"{job_id}: failed: {reason}"


def _worker(instance_ref, settings: Settings, tasks, results, tags) -> None:
    """A worker process of ``ingest_once``: imports and loads the model once, then runs the
    tracks it takes from ``tasks`` one after the other (each in its own Dagster run). It
    counts as busy in the host's ``CoreShare`` for each whole track, so the separations
    of busy workers split the cores between them."""
    instance = DagsterInstance.from_ref(instance_ref)
    job_def = build_defs(settings).resolve_job_def("ingest_track")
    share = separation.CoreShare(separation.DEFAULT_CORE_SHARE_DIR)
    while True:
        item = tasks.get()
        if item is None:
            return
        job_id, queue = item
        try:
            with share.busy():  # a core of its own for this track, separation or not
                ok, line = _run_track(instance, settings, job_def, job_id, queue, tags)
        except Exception as exc:  # noqa: BLE001 - reported per track, the worker goes on
            ok, line = False, f"{job_id}: failed: {type(exc).__name__}: {exc}"
        results.put((job_id, ok, line))


def _run_workers(instance: DagsterInstance, settings: Settings, todo: list[tuple[str, str]],
                 workers: int, out: TextIO, tags: dict[str, str] | None = None) -> int:
    """Process ``todo`` with ``workers`` spawned processes; returns the number of failures.
    A worker that dies (killed for memory, say) fails nothing it had not finished: its claim
    is left in working/ for the next pass's recovery, and its remaining tracks go to the
    other workers."""
    ctx = multiprocessing.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in todo:
        tasks.put(item)
    for _ in range(workers):
        tasks.put(None)
    procs = [ctx.Process(target=_worker, name=f"imaker-ingest-{i}", daemon=True,
                         args=(instance.get_ref(), settings, tasks, results, tags))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    pending = {job_id for job_id, _ in todo}
    failures = 0
    try:
        while pending:
            try:
                job_id, ok, line = results.get(timeout=1.0)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            pending.discard(job_id)
            failures += 0 if ok else 1
            print(line, file=out, flush=True)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    for job_id in sorted(pending):
        codes = ", ".join(str(p.exitcode) for p in procs)
        print(f"{job_id}: not finished: the worker processes exited (exit codes {codes}); "
              "a claimed track is recovered on the next pass", file=out, flush=True)
        failures += 1
    return failures


def ingest_once(instance: DagsterInstance, settings: Settings, out: TextIO | None = None) -> int:
    """Register and process every ready bundle once, then refresh the catalog.
    Returns the number of failed jobs.

    Batch ingestion: the tracks go to ``worker_count`` long-lived worker processes (imports
    and the model load are paid once per worker, not per track; one worker decodes,
    encodes and analyses while the other separates; CPU threads are shared between the
    separations). Every track still gets its own ``ingest_track`` run and partition.
    With a pool limit of 1 for ``gpu`` (the `stems` step) the separations themselves take
    turns, and only the rest of the work overlaps (what a single GPU wants)."""
    out = out or sys.stdout
    store = QueueStore.from_settings(settings)
    store.ensure_dirs()
    for job_id, action in store.recover_stale(claim_alive(instance)):
        print(f"{job_id}: recovered a dead claim: {action}", file=out, flush=True)
    ready, invalid = store.scan()
    failures = 0
    for entry in invalid:
        store.reject(entry)
        print(f"{entry.path.name}: failed: {entry.reason}", file=out, flush=True)
        failures += 1
    if not ready and not invalid:
        print("no bundles waiting in " + ", ".join(str(p) for p in settings.queues.values()),
              file=out, flush=True)
        return 0
    todo: list[tuple[str, str]] = []
    seen: set[str] = set()
    for job in ready:
        if job.job_id in seen:
            print(f"{job.job_id}: another copy is queued in {job.queue}; left for the next pass",
                  file=out, flush=True)
            continue
        seen.add(job.job_id)
        todo.append((job.job_id, job.queue))
    failures += process_tracks(instance, settings, todo, out)
    refresh_catalog(instance, settings)
    return failures


def process_tracks(instance: DagsterInstance, settings: Settings, todo: list[tuple[str, str]],
                   out: TextIO, tags: dict[str, str] | None = None) -> int:
    """Run ``ingest_track`` for each ``(job_id, queue)`` — in ``worker_count`` worker
    processes when there are several — adding missing partitions first. Prints one line
    per track on ``out``; returns the number that failed."""
    missing = [job_id for job_id, _ in todo
               if not instance.has_dynamic_partition(tracks.name, job_id)]
    if missing:
        instance.add_dynamic_partitions(tracks.name, missing)
    workers = worker_count(settings, len(todo))
    if workers > 1 and not instance.is_ephemeral:
        return _run_workers(instance, settings, todo, workers, out, tags)
    failures = 0
    job_def = build_defs(settings).resolve_job_def("ingest_track")
    for job_id, queue in todo:
        ok, line = _run_track(instance, settings, job_def, job_id, queue, tags)
        failures += 0 if ok else 1
        print(line, file=out, flush=True)
    return failures


def backfill_variants(instance: DagsterInstance, settings: Settings, add_variants: list[str],
                      job_ids: Iterable[str] | None = None, out: TextIO | None = None) -> int:
    """Re-mix ``variants`` + ``manifest`` (and their checks) for existing tracks from the
    stored stems, adding ``add_variants``. A track whose stems were purged is separated
    again first (said on ``out``). Returns the number of tracks that failed."""
    out = out or sys.stdout
    unknown = [v for v in add_variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    resources = build_resources(settings, extra_variants=list(add_variants))
    lib = Library.from_settings(settings)
    keys = list(job_ids) if job_ids else instance.get_dynamic_partitions(tracks.name)
    failures = 0
    for job_id in keys:
        if not (lib.track_dir(job_id) / "source.flac").is_file():
            print(f"{job_id}: skipped: no stored source (re-queue its bundle)", file=out, flush=True)
            continue
        selection = [variants, manifest]
        if not lib.has_stems(job_id):
            print(f"{job_id}: stems were purged: separating again first", file=out, flush=True)
            selection.insert(0, stems)
        result = materialize(
            [*track_assets, *track_checks], instance=instance, partition_key=job_id,
            selection=AssetSelection.assets(*selection), resources=resources,
            run_config=QUIET, raise_on_error=False,
            tags={"imaker/job_id": job_id, "imaker/trigger": "imaker-backfill"})
        if result.success:
            print(f"{job_id}: {settings.outputs_dir / job_id}", file=out, flush=True)
        else:
            failures += 1
            print(f"{job_id}: failed", file=out, flush=True)
    refresh_catalog(instance, settings)
    return failures


def forget(instance: DagsterInstance, settings: Settings, job_id: str, *,
           outputs: bool = False) -> None:
    """Delete the track's partition, its stored source and stems (and its outputs when asked),
    then refresh the catalog. The archived bundle is kept."""
    if instance.has_dynamic_partition(tracks.name, job_id):
        instance.delete_dynamic_partition(tracks.name, job_id)
    Library.from_settings(settings).forget(job_id, outputs=outputs)
    refresh_catalog(instance, settings)
