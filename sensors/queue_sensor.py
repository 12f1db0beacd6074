"""Watches the queue folders: one dynamic partition per new bundle, and one run per bundle
— or, when a tick finds at least SENSOR_BATCH_MIN new bundles, one ``ingest_batch`` run for
all of them (imports and the model load paid once; each track still runs as its own
``ingest_track`` run inside it)."""


import hashlib
import json

from dagster import (DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult,
                     SkipReason, sensor)

from imaker.bundle import BundleError, read_json_file
from imaker.settings import load_settings
from imaker_assets.batch import ingest_batch
from imaker_assets.jobs import ingest_track
from imaker_assets.partitions import tracks
from imaker_assets.runtime import claim_alive
from resources import QueueResource


def _cursor(raw: str | None) -> tuple[int, str]:
    try:
        ns, name = json.loads(raw or "")
        return int(ns), str(name)
    except (ValueError, TypeError):
        return (-1, "")


def _source_type(path) -> str:
    try:
        data = read_json_file(path / "job.json", max_bytes=64 * 1024)
        value = data.get("source_type") if isinstance(data, dict) else None
    except BundleError:
        value = None
    return value[:32] if isinstance(value, str) and value.isprintable() else "unknown"


@sensor(jobs=[ingest_track, ingest_batch], minimum_interval_seconds=5,
        default_status=DefaultSensorStatus.RUNNING,
        description="Scans the queue folders (QUEUE_YOUTUBE_AUDIO, QUEUE_YOUTUBE_VIDEO, "
                    "QUEUE_OTHER) for ready job_<id>/ bundles, adds a `tracks` partition per "
                    "bundle and requests its run (one ingest_batch run when a tick finds "
                    "SENSOR_BATCH_MIN or more). Ignores *.tmp; recovers claims of dead runs.")
def queue_sensor(context: SensorEvaluationContext, queues: QueueResource):
    store = queues.store()
    store.ensure_dirs()
    for job_id, action in store.recover_stale(claim_alive(context.instance)):
        context.log.warning(f"job {job_id}: its run died; {action}")
    ready, invalid = store.scan()
    for entry in invalid:
        dest = store.reject(entry)
        context.log.warning(f"rejected {entry.path.name} from {entry.queue}: {entry.reason} -> {dest}")

    after = _cursor(context.cursor)
    settings = load_settings()
    limit = settings.sensor_max_jobs_per_tick
    in_work = {p.name for p in store.working_dir.iterdir()} if store.working_dir.is_dir() else set()
    batch, seen = [], set()
    for job in (j for j in ready if j.order_key > after):
        # Another copy of this job is being processed (or is earlier in this batch): wait
        # for it to finish, keeping FIFO order, rather than skip it.
        if job.path.name in in_work or job.job_id in seen or len(batch) >= limit:
            break
        batch.append(job)
        seen.add(job.job_id)
    if not batch:
        return SkipReason(f"no new bundles ({len(ready)} waiting, "
                          f"{len(in_work)} in progress)")

    known = set(context.instance.get_dynamic_partitions(tracks.name))
    new_keys = [j.job_id for j in batch if j.job_id not in known]
    if settings.sensor_batch_min and len(batch) >= settings.sensor_batch_min:
        keys = [store.run_key(j) for j in batch]
        requests = [RunRequest(
            job_name=ingest_batch.name,
            run_key="batch-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20],
            run_config={"ops": {"ingest_tracks": {"config": {
                "job_ids": [j.job_id for j in batch], "queues": [j.queue for j in batch]}}}},
            tags={"imaker/batch_size": str(len(batch)), "imaker/first_job_id": batch[0].job_id})]
    else:
        requests = [RunRequest(run_key=store.run_key(j), partition_key=j.job_id,
                               job_name=ingest_track.name,
                               tags={"imaker/job_id": j.job_id, "imaker/queue": j.queue,
                                     "imaker/source_type": _source_type(j.path)})
                    for j in batch]
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[tracks.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps(list(batch[-1].order_key)))
