"""When to notify (``NOTIFY_URLS``): the Dagster side of ``imaker.notify``.

The notification sensors (``sensors/notify_sensor.py``) are Dagster run status sensors on
`ingest_track`, one per final run status. Each keeps its own cursor in the instance (the
storage id of the last run-status event it handled), so every run outcome is handled once,
and outcomes that happened while no daemon ran are handled when one starts again.

    SUCCESS                     -> "done" (outputs/<job_id>/manifest.json)
    FAILURE, dagster/will_retry -> nothing: Dagster's run retries start the next attempt,
                                   whose outcome is the one notified
    FAILURE, CANCELED           -> "failed" (the reason from archive/failed/job_<id>/error.json
                                   when a step archived it, else from the run's event log)
"""

from __future__ import annotations

from dagster import (AssetKey, DagsterEventType, DagsterInstance, DagsterRun, DagsterRunStatus,
                     RunsFilter, RunStatusChangeRecordsFilter)
# not exported by Dagster (pinned 1.13.27): the run status sensors' stored cursor, read by
# `unhandled_outcomes` for `imaker ingest` (tests/test_notify.py fails if they change)
from dagster._core.definitions.run_status_sensor_definition import RunStatusSensorCursor
from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType

from imaker import notify
from imaker.queues import QueueStore, read_failure
from imaker.settings import Settings

from .assets import DROP_TAG
from .lifecycle import JOB_NAME, drop_failure, will_retry

#: sensor name -> the run status it handles
NOTIFY_SENSORS = {"notify_done": DagsterRunStatus.SUCCESS,
                  "notify_failed": DagsterRunStatus.FAILURE,
                  "notify_canceled": DagsterRunStatus.CANCELED}
_EVENT = {DagsterRunStatus.SUCCESS: DagsterEventType.RUN_SUCCESS,
          DagsterRunStatus.FAILURE: DagsterEventType.RUN_FAILURE,
          DagsterRunStatus.CANCELED: DagsterEventType.RUN_CANCELED}
_MANIFEST = AssetKey("manifest")


def run_outcome(instance: DagsterInstance, run: DagsterRun,
                settings: Settings) -> notify.TrackOutcome | None:
    """The track outcome a finished `ingest_track` run stands for; None when it is not a
    final outcome to tell anyone about (Dagster will retry it, it did not make the track)."""
    job_id = run.tags.get("dagster/partition") or run.tags.get("imaker/job_id")
    if not job_id:
        return None
    if run.status == DagsterRunStatus.SUCCESS:
        if run.asset_selection is not None and _MANIFEST not in run.asset_selection:
            return None  # a re-execution of e.g. nas_copy alone: the track was done before
        return notify.outcome_done(settings.paths.outputs_dir, job_id)
    if run.status not in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        return None
    if will_retry(instance, run):
        return None
    store = QueueStore.from_settings(settings)
    drop = run.tags.get(DROP_TAG)
    where = store.settled(job_id, drop) if drop else None
    failure = read_failure(where[1]) if where and where[0] == "failed" else None
    if failure is None:
        # a dead or canceled run (the queue sensor archives it with this same reason), or a
        # step after the manifest (nas_copy: the bundle is in done/, the outputs exist)
        failure = drop_failure(instance, run)
    located = where or store.locate(job_id)
    return notify.outcome_failed(job_id, *failure, bundle_dir=located[1] if located else None)


def handle_run(instance: DagsterInstance, run: DagsterRun, settings: Settings, log) -> None:
    """What a notification sensor does with one finished run. Never raises for a receiver
    that is down: it logs a warning (the track is not affected; nothing is retried)."""
    if not settings.notify.urls:
        return
    outcome = run_outcome(instance, run, settings)
    if outcome is None or outcome.state not in settings.notify.on:
        return
    result = notify.send(settings.notify.urls, outcome)
    if result.ok:
        log.info(f"notified: job {outcome.job_id} {outcome.state}")
    else:
        log.warning(f"could not notify job {outcome.job_id} {outcome.state}: {result.detail}")


def unhandled_outcomes(instance: DagsterInstance, limit: int = 100) -> list[str]:
    """Run ids of finished `ingest_track` runs that a running notification sensor has not
    handled yet (its cursor is before their status event). A sensor that was stopped (in
    the UI) handles nothing and is not waited for; one that never ticked waits for its
    first tick. ``imaker ingest`` waits on this before it stops the daemon it started."""
    states: dict[str, list] = {}
    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.instigator_name in NOTIFY_SENSORS:
            states.setdefault(state.instigator_name, []).append(state)
    pending: set[str] = set()
    for name, status in NOTIFY_SENSORS.items():
        found = states.get(name, [])
        if found and all(s.status == InstigatorStatus.STOPPED for s in found):
            continue
        cursors = [RunStatusSensorCursor.from_json(s.instigator_data.cursor).record_id
                   for s in found if s.instigator_data is not None
                   and s.instigator_data.cursor
                   and RunStatusSensorCursor.is_valid(s.instigator_data.cursor)]
        if not cursors:
            return ["(the notification sensors have not started yet)"]
        # the same query the sensor makes: status events after its cursor
        records = instance.fetch_run_status_changes(
            records_filter=RunStatusChangeRecordsFilter(event_type=_EVENT[status],
                                                        after_storage_id=max(cursors)),
            limit=limit, ascending=True).records
        ids = list({r.event_log_entry.run_id for r in records})
        if ids:
            pending |= {r.run_id for r in instance.get_runs(
                filters=RunsFilter(run_ids=ids, job_name=JOB_NAME))}
    return sorted(pending)
