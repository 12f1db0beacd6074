"""Watches the queue folders and keeps each bundle's lifecycle in step with its runs
(``imaker_assets.lifecycle.reconcile``): claims new bundles, adds one `tracks` partition
and requests one `ingest_track` run per drop (through the daemon's run queue), and
archives drops whose runs are over."""

import os

from dagster import (DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason,
                     sensor)

from imaker.bundle import BundleError, read_json_file
from imaker.queues import QueueStore
from imaker_assets.jobs import ingest_track
from imaker_assets.lifecycle import reconcile
from imaker_assets.partitions import tracks
from resources import SettingsResource

#: "1" in the environment of the daemon that `imaker ingest --once` starts when no daemon
#: serves the instance: its sensor only drives existing claims (new bundles dropped
#: meanwhile wait for the next `imaker ingest` or for `dagster dev`)
INGEST_ONLY_ENV = "IMAKER_INGEST_ONLY"


def _source_type(path) -> str:
    try:
        data = read_json_file(path / "job.json", max_bytes=64 * 1024)
        value = data.get("source_type") if isinstance(data, dict) else None
    except BundleError:
        value = None
    return value[:32] if isinstance(value, str) and value.isprintable() else "unknown"


@sensor(jobs=[ingest_track], minimum_interval_seconds=5,
        default_status=DefaultSensorStatus.RUNNING,
        description="Scans the queue folders (QUEUE_YOUTUBE_AUDIO, QUEUE_YOUTUBE_VIDEO, "
                    "QUEUE_OTHER) for ready job_<id>/ bundles (ignores *.tmp), claims each "
                    "into working/, adds its `tracks` partition and requests one ingest_track "
                    "run per drop; archives drops whose runs ended (done/ or failed/).")
def queue_sensor(context: SensorEvaluationContext, settings: SettingsResource):
    settings = settings.get()
    store = QueueStore.from_settings(settings)
    claim_new = os.environ.get(INGEST_ONLY_ENV) != "1"
    result = reconcile(context.instance, store, settings, claim_new=claim_new,
                       source_type=_source_type)
    for line in result.rejected:
        context.log.warning(f"rejected {line}")
    for job_id, state, reason in result.settled:
        (context.log.warning if state == "failed" else context.log.info)(
            f"job {job_id}: {state}" + (f": {reason}" if reason else ""))
    if not result.run_requests:
        return SkipReason(f"no new bundles ({result.waiting} waiting, "
                          f"{result.in_progress} in progress)")
    return SensorResult(
        run_requests=result.run_requests,
        dynamic_partitions_requests=([tracks.build_add_request(result.new_partitions)]
                                     if result.new_partitions else []))
