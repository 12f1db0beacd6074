"""What the `imaker` commands do with Dagster: in-process runs against an instance."""

from __future__ import annotations

import sys
from typing import Iterable, TextIO

from dagster import AssetSelection, DagsterInstance, materialize

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


def ingest_once(instance: DagsterInstance, settings: Settings, out: TextIO | None = None) -> int:
    """Register and process every ready bundle once, then refresh the catalog.
    Returns the number of failed jobs."""
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
    job_def = build_defs(settings).resolve_job_def("ingest_track")
    seen: set[str] = set()
    for job in ready:
        if job.job_id in seen:
            print(f"{job.job_id}: another copy is queued in {job.queue}; left for the next pass",
                  file=out, flush=True)
            continue
        seen.add(job.job_id)
        if not instance.has_dynamic_partition(tracks.name, job.job_id):
            instance.add_dynamic_partitions(tracks.name, [job.job_id])
        tags = {"imaker/job_id": job.job_id, "imaker/queue": job.queue,
                "imaker/trigger": "imaker-ingest"}
        result = job_def.execute_in_process(
            partition_key=job.job_id, instance=instance, raise_on_error=False, run_config=QUIET,
            asset_selection=[a.key for a in track_assets], tags=tags)
        if result.success:
            # NAS copy in its own run without the in-process retry sleeps: a NAS that is
            # down fails this job at once; the sensor path (daemon) keeps the retry policy.
            nas = materialize([NAS_COPY_NO_RETRY], partition_key=job.job_id, instance=instance,
                              resources=build_resources(settings), run_config=QUIET,
                              raise_on_error=False, tags=tags)
            if nas.success:
                print(f"{job.job_id}: {settings.outputs_dir / job.job_id}", file=out, flush=True)
                continue
            result = nas
        failures += 1
        error = store.read_error(job.job_id)
        if error:
            reason = f"{error['stage']}: {error['error']}"
        else:
            events = [e for e in result.all_events if e.is_step_failure or e.is_failure]
            reason = events[0].message if events else "run failed"
        print(f"{job.job_id}: failed: {reason}", file=out, flush=True)
    refresh_catalog(instance, settings)
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
