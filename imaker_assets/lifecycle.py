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

from dagster import DagsterInstance, DagsterRunStatus, RunRequest, RunsFilter

from imaker.queues import Claim, ClaimLost, QueueStore
from imaker.settings import Settings

from .assets import DROP_TAG
from .partitions import tracks

WILL_RETRY_TAG = "dagster/will_retry"
MAX_RETRIES_TAG = "dagster/max_retries"
JOB_NAME = "ingest_track"
_FAILED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


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


def failure_reason(instance: DagsterInstance, run) -> tuple[str, str]:
    """(stage, reason) of a failed or canceled run, from its event log."""
    from dagster import DagsterEventType

    if run.status == DagsterRunStatus.CANCELED:
        return "run", f"run {run.run_id} was canceled"
    records = instance.get_records_for_run(
        run.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE,
                             DagsterEventType.ENGINE_EVENT}).records
    step = next((r.event_log_entry for r in records
                 if r.event_log_entry.dagster_event.event_type == DagsterEventType.STEP_FAILURE),
                None)
    if step is not None and "blocking asset check" in (step.dagster_event.message or "") + \
            (step.dagster_event.step_failure_data.error.message
             if step.dagster_event.step_failure_data.error else ""):
        failed = [r.event_log_entry.dagster_event.event_specific_data for r in
                  instance.get_records_for_run(
                      run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION).records]
        reasons = [f"{e.check_name}: {e.description}" for e in failed if not e.passed]
        if reasons:
            return "checks", "blocking check failed: " + "; ".join(reasons)
    if step is not None:
        data = step.dagster_event.step_failure_data
        message = (data.user_failure_data.description if data.user_failure_data else None) \
            or _error_text(data.error) or step.dagster_event.message
        return step.step_key or "run", message
    engine = [r.event_log_entry.message for r in records
              if r.event_log_entry.dagster_event.event_type == DagsterEventType.ENGINE_EVENT
              and r.event_log_entry.message
              and any(w in r.event_log_entry.message for w in ("unexpectedly", "Detected run",
                                                                "exit code", "terminated"))]
    fail = [r.event_log_entry.message for r in records
            if r.event_log_entry.dagster_event.event_type == DagsterEventType.RUN_FAILURE]
    text = (engine[-1] if engine else None) or (fail[-1] if fail else None) or "the run failed"
    return "run", f"run {run.run_id} failed: {text.strip()}"


def _error_text(error) -> str | None:
    """The message of a step's error; for an exhausted retry, the error behind it."""
    if error is None:
        return None
    text = error.message.strip()
    cause = error.cause
    while cause is not None and (text.startswith("Exceeded max_retries")
                                 or "RetryRequested" in text):
        text = f"{cause.message.strip()} ({text.rstrip('.')})"
        cause = cause.cause
    return text


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
        if newest.status == DagsterRunStatus.FAILURE and newest.tags.get(WILL_RETRY_TAG) == "true":
            return None  # Dagster's run retries start the next attempt
        stage, reason = failure_reason(instance, newest)
        attempts = len(runs)
        if attempts > 1:
            reason += f" (after {attempts} attempts)"
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
