"""A bundle's lifecycle follows its Dagster runs (the queue sensor calls ``reconcile``).

    queue/job_<id>/  --claim (atomic rename, new drop id)-->  working/job_<id>/
    working/         --the drop has no run--> one `ingest_track` run (run_key = drop id)
                     --its run succeeded----> done/   (the `manifest` step archives it)
                     --a step failed--------> failed/ (the step archives it with error.json)
                     --its last run ended failed or canceled and Dagster will not retry it
                       (run monitoring marked a dead worker failed; run retries exhausted)
                                         ----> failed/ with the run's failure as the reason

Dead runs are detected by Dagster (run monitoring, the code server's check for run
processes that died) and retried by Dagster's run retries (tag ``dagster/max_retries`` =
MAX_CLAIM_ATTEMPTS - 1, copied to every retry with ``imaker/drop_id``). There is no pid or
heartbeat of ours: the only question asked here is "what is the status of this drop's
newest run?", and the answer is idempotent, so a tick that dies halfway is simply redone
(``run_key`` = drop id makes a repeated request a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import (AssetCheckEvaluation, AssetCheckSeverity, DagsterEventType,
                     DagsterInstance, DagsterRun, DagsterRunStatus, RetryRequested, RunRequest,
                     RunsFilter)
# Not exported by Dagster (pinned 1.13.27): the structured failure data a run leaves, and the
# run retries' own "will this run be retried" rule (tests/test_failure_reason.py,
# test_sensor.py and test_notify.py fail if they change).
from dagster._core.errors import DagsterAssetCheckFailedError
from dagster._core.events import JobFailureData, RunFailureReason
from dagster._core.execution.plan.objects import ErrorSource
from dagster._core.execution.plan.utils import RetryRequestedFromPolicy
from dagster._core.execution.retries import auto_reexecution_should_retry_run
from dagster._core.storage.tags import MAX_RETRIES_TAG, RUN_FAILURE_REASON_TAG, WILL_RETRY_TAG
from dagster._utils.tags import get_boolean_tag_value

from imaker.queues import Claim, ClaimLost, QueueStore
from imaker.settings import Settings

from .assets import DROP_TAG, FAILED_TRACKS
from .partitions import tracks

JOB_NAME = "ingest_track"
_FAILED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
#: a step error of these classes is a retry request that ran out of retries: its cause is why
_RETRY_ERRORS = {RetryRequested.__name__, RetryRequestedFromPolicy.__name__}


@dataclass
class Reconciled:
    run_requests: list[RunRequest] = field(default_factory=list)
    new_partitions: list[str] = field(default_factory=list)
    claimed: list[Claim] = field(default_factory=list)
    settled: list[tuple[str, str, str]] = field(default_factory=list)  # job, state, reason
    rejected: list[str] = field(default_factory=list)
    waiting: int = 0
    in_progress: int = 0


def run_tags(claim: Claim, settings: Settings, source_type: str = "unknown") -> dict[str, str]:
    return {"imaker/job_id": claim.job_id, DROP_TAG: claim.drop_id,
            "imaker/queue": claim.queue, "imaker/source_type": source_type,
            MAX_RETRIES_TAG: str(max(0, settings.ingest.max_claim_attempts - 1))}


def drop_runs(instance: DagsterInstance, drop_id: str):
    """The runs of one drop, newest first (the first run and Dagster's retries of it)."""
    return instance.get_runs(filters=RunsFilter(tags={DROP_TAG: drop_id}))


def will_retry(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Whether Dagster's run retries will start another attempt of this finished run: the
    ``dagster/will_retry`` tag Dagster gives a failed run. It is written just after the run's
    failure is stored, so the run is read again, and while the tag is not there yet the
    answer is Dagster's own rule for it (``auto_reexecution_should_retry_run``, given the
    run's ``dagster/failure_reason``). Only failed runs are retried, and only when the
    instance has run retries on."""
    if not instance.run_retries_enabled:
        return False
    run = instance.get_run_by_id(run.run_id) or run
    if run.status != DagsterRunStatus.FAILURE:
        return False
    tag = run.tags.get(WILL_RETRY_TAG)
    if tag is not None:
        return get_boolean_tag_value(tag, default_value=False)
    reason = run.tags.get(RUN_FAILURE_REASON_TAG)
    return auto_reexecution_should_retry_run(
        instance, run, RunFailureReason(reason) if reason else None)


def failure_reason(instance: DagsterInstance, run: DagsterRun) -> tuple[str, str]:
    """(stage, reason) of a failed or canceled run, from the failure data Dagster recorded:

    * a step failed (the run worker's failure event names the first one): that step and its
      error — a blocking check (``DagsterAssetCheckFailedError``)
      as the failed checks' descriptions, an exhausted retry as the error behind it;
    * the run failed outside any step (it could not start, its worker died or was killed):
      ``run`` and the failure's error or message. A run marked failed from outside its worker
      carries no failure data; whoever marked it explains why in the failure's message (run
      monitoring) or in an engine event it logged just before (the code server, when a run
      process exits): both are given."""
    if run.status == DagsterRunStatus.CANCELED:
        return "run", f"run {run.run_id} was canceled"
    records = [r.event_log_entry for r in instance.get_records_for_run(run.run_id).records
               if r.event_log_entry.dagster_event is not None]
    events = [e.dagster_event for e in records]
    at = max((i for i, e in enumerate(events) if e.event_type == DagsterEventType.RUN_FAILURE),
             default=None)
    failure = events[at] if at is not None else None
    data = failure.event_specific_data if failure is not None else None
    data = data if isinstance(data, JobFailureData) else None
    step = (data.first_step_failure_event if data is not None else None) or next(
        (e for e in events if e.event_type == DagsterEventType.STEP_FAILURE), None)
    if step is not None:
        return _step_failure(events, step)
    if failure is None:
        text = "the run failed"
    elif data is not None and data.error is not None:
        text = _error_text(data.error)
    else:
        text = (failure.message or "the run failed").strip()
        before = events[at - 1] if at and data is None else None
        if before is not None and before.event_type == DagsterEventType.ENGINE_EVENT \
                and before.pid == failure.pid and before.message:
            text = f"{before.message.strip()} ({text.rstrip('.')})"
    return "run", f"run {run.run_id} failed: {text}"


def track_failures(instance: DagsterInstance, run: DagsterRun,
                   job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """(stage, reason) for each track of a failed run of ``job_ids`` (one partition, or a
    range of them: a backfill run).

    One track: ``failure_reason``. Several: Dagster records a step's success or failure for
    its whole range, so the reasons of single tracks come from what the steps recorded per
    track: a step's ``Failure`` metadata ``failed_tracks`` (``assets.each_track``) and the
    failed blocking check evaluations, which carry their partition (``checks``). A track of
    the range not named there was held back by the others (``not recorded: …``); a failure
    outside the steps (the run could not start, its process died) is every track's."""
    stage, reason = failure_reason(instance, run)
    if len(job_ids) == 1:
        return {job_ids[0]: (stage, reason)}
    named: dict[str, tuple[str, str]] = {}
    checks: dict[str, list[str]] = {}
    for record in instance.get_records_for_run(run.run_id).records:
        event = record.event_log_entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_FAILURE:
            user = event.step_failure_data.user_failure_data
            listed = user.metadata.get(FAILED_TRACKS) if user is not None else None
            for job_id, why in (listed.value if listed is not None else {}).items():
                named.setdefault(job_id, (event.step_key or "run", why))
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            data = event.event_specific_data
            if isinstance(data, AssetCheckEvaluation) and _stops(data) \
                    and data.partition is not None:
                checks.setdefault(data.partition, []).append(
                    f"{data.check_name}: {data.description}")
    for job_id, failed in checks.items():
        named.setdefault(job_id, ("checks", "blocking check failed: " + "; ".join(failed)))
    if not named:
        return {job_id: (stage, reason) for job_id in job_ids}
    culprits = ", ".join(j for j in job_ids if j in named)
    return {job_id: named.get(job_id) or (
        stage, f"not recorded: {culprits} failed in the same run of {len(job_ids)} tracks "
               "(this track's own work finished; run it again without them)")
        for job_id in job_ids}


def _stops(evaluation: AssetCheckEvaluation) -> bool:
    """A failed blocking evaluation that stops its run (ERROR; a WARN one is only shown)."""
    return not evaluation.passed and evaluation.blocking \
        and evaluation.severity == AssetCheckSeverity.ERROR


def _step_failure(events, step) -> tuple[str, str]:
    data = step.step_failure_data
    if data.error is not None and data.error.cls_name == DagsterAssetCheckFailedError.__name__:
        failed = [e.event_specific_data for e in events
                  if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]
        reasons = [f"{e.check_name}: {e.description}" for e in failed
                   if isinstance(e, AssetCheckEvaluation) and _stops(e)]
        if reasons:
            return "checks", "blocking check failed: " + "; ".join(reasons)
    message = (data.user_failure_data.description if data.user_failure_data else None) \
        or _error_text(data.error, data.error_source) or step.message
    return step.step_key or "run", message


def _error_text(error, source: ErrorSource | None = None) -> str | None:
    """The message of an error; for an exception raised in our code, that exception (not
    Dagster's wrapper around it); for an exhausted retry, the error behind it."""
    if error is None:
        return None
    if source == ErrorSource.USER_CODE_ERROR and error.cause is not None \
            and error.cls_name not in _RETRY_ERRORS:
        error = error.cause
    text = error.message.strip()
    while error.cls_name in _RETRY_ERRORS and error.cause is not None:
        error = error.cause
        text = f"{error.message.strip()} ({text.rstrip('.')})"
    return text


def drop_failure(instance: DagsterInstance, run: DagsterRun) -> tuple[str, str]:
    """``failure_reason`` of a drop's last run, saying how many runs the drop took."""
    stage, reason = failure_reason(instance, run)
    drop = run.tags.get(DROP_TAG)
    attempts = len(drop_runs(instance, drop)) if drop else 1
    if attempts > 1:
        reason += f" (after {attempts} attempts)"
    return stage, reason


def settle(instance: DagsterInstance, store: QueueStore, claim: Claim) -> tuple[str, str] | None:
    """Archive a drop whose runs are over: (state, reason) when it was archived now, None
    while it has no run yet or a run in progress or about to be retried."""
    runs = drop_runs(instance, claim.drop_id)
    if not runs:
        return None
    newest = runs[0]
    if not newest.is_finished:
        return None
    if newest.status == DagsterRunStatus.SUCCESS:
        store.archive_done(claim.job_id, claim.drop_id)
        return "done", ""
    if newest.status in _FAILED:
        if will_retry(instance, newest):
            return None  # Dagster's run retries start the next attempt
        stage, reason = drop_failure(instance, newest)
        if store.fail(claim.job_id, claim.drop_id, stage, reason) is not None:
            return "failed", reason
    return None


def claim_ready(store: QueueStore, settings: Settings, *, by: str, limit: int | None = None,
                source_type=lambda path: "unknown") -> tuple[list[tuple[Claim, str]], list[str], int]:
    """Reject what can never be a job, then claim ready bundles oldest first (at most
    ``limit``), skipping a job whose earlier drop is still in working/ (it waits for it).
    Returns ([(claim, source type)], rejected lines, bundles left waiting)."""
    store.ensure_dirs()
    ready, invalid = store.scan()
    rejected = [f"{entry.path.name}: {entry.reason}" for entry in invalid
                if store.reject(entry) is not None]
    claimed: list[tuple[Claim, str]] = []
    busy = {c.job_id for c in store.claims()}
    for job in ready:
        if limit is not None and len(claimed) >= limit:
            break
        if job.job_id in busy:
            continue
        kind = source_type(job.path)
        try:
            claim = store.claim(job, by=by)
        except ClaimLost:
            continue  # the sensor, `imaker ingest` or another daemon took it
        busy.add(job.job_id)
        claimed.append((claim, kind))
    return claimed, rejected, len(ready) - len(claimed)


def reconcile(instance: DagsterInstance, store: QueueStore, settings: Settings, *,
              claim_new: bool = True, source_type=lambda path: "unknown") -> Reconciled:
    """One pass of the queue sensor: claim new bundles (at most SENSOR_MAX_JOBS_PER_TICK),
    request a run for each drop without one, settle drops whose runs are over."""
    out = Reconciled()
    kinds: dict[str, str] = {}
    if claim_new:
        claimed, out.rejected, out.waiting = claim_ready(
            store, settings, by="queue_sensor", limit=settings.ingest.sensor_max_jobs_per_tick,
            source_type=source_type)
        out.claimed = [c for c, _ in claimed]
        kinds = {c.drop_id: kind for c, kind in claimed}
    known = None
    for claim in store.claims():
        runs = drop_runs(instance, claim.drop_id)
        if not runs:
            if known is None:
                known = set(instance.get_dynamic_partitions(tracks.name))
            if claim.job_id not in known and claim.job_id not in out.new_partitions:
                out.new_partitions.append(claim.job_id)
            out.run_requests.append(RunRequest(
                run_key=claim.drop_id, partition_key=claim.job_id, job_name=JOB_NAME,
                tags=run_tags(claim, settings, kinds.get(claim.drop_id, "unknown"))))
            continue
        done = settle(instance, store, claim)
        if done is not None:
            out.settled.append((claim.job_id, done[0], done[1]))
        else:
            out.in_progress += 1
    return out
