"""What the `imaker` commands do with Dagster, against ``$DAGSTER_HOME``'s instance."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, TextIO

from dagster import (AssetSelection, BackfillPolicy, DagsterInstance, DagsterRunStatus,
                     materialize, partition_loading_context)
# Not exported by Dagster (pinned 1.13.27): how the asset backfill daemon cuts a backfill
# into runs by the assets' backfill policies (asset_backfill.py calls it), and the keys it
# uses; `imaker backfill` groups its runs with it, so CLI and UI backfills group alike
from dagster._core.definitions.assets.graph.asset_graph import AssetGraph
from dagster._core.definitions.automation_tick_evaluation_context import (
    build_run_requests_with_backfill_policies)
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.storage.tags import (ASSET_PARTITION_RANGE_END_TAG,
                                        ASSET_PARTITION_RANGE_START_TAG)

from imaker import pipeline
from imaker.pipeline import Library
from imaker.queues import Claim, QueueStore
from imaker.settings import Settings
from imaker.variants import VARIANTS
from resources import build_resources
from sensors.queue_sensor import INGEST_ONLY_ENV

from .assets import manifest, stems, track_assets, variants
from .catalog import catalog
from .checks import track_checks
from .lifecycle import claim_ready, drop_runs, failure_reason, track_failures, will_retry
from .notifications import unhandled_outcomes
from .partitions import tracks

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
#: a daemon whose sensor and run-queue heartbeats are younger than this serves the instance
#: (Dagster's daemons beat every 30 s)
HEARTBEAT_FRESH_S = 70.0
WORKSPACE = """load_from:
  - python_module:
      module_name: imaker_assets.definitions
      attribute: defs
      location_name: instrumental_maker
"""


def _materialize(*args, **kwargs):
    """Dagster's ``materialize`` in this process, with SIGINT/SIGTERM left as they were.
    Dagster's in-process execution (``capture_interrupts``) ends by pointing SIGTERM at
    SIGINT's handler (``dagster._utils.interrupts.setup_interrupt_handlers``): in a process
    started with SIGINT ignored (a background job of a script, nohup, some supervisors) that
    is SIGTERM *ignored* from then on, in it and in every process it starts later (an
    ignored signal survives exec), so `kill -TERM` no longer stopped `imaker ingest`."""
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        return materialize(*args, **kwargs)
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: a handler not set from Python (left alone)
                signal.signal(sig, handler)


def refresh_catalog(instance: DagsterInstance, settings: Settings) -> bool:
    result = _materialize([catalog], instance=instance, resources=build_resources(settings),
                         run_config=QUIET, raise_on_error=False)
    return result.success


def daemon_serving(instance: DagsterInstance) -> bool:
    """Whether a Dagster daemon (``dagster dev``, ``dagster-daemon run``, compose) is
    evaluating sensors and dequeuing runs for this instance now."""
    beats = instance.get_daemon_heartbeats()
    now = time.time()
    return all(kind in beats and now - beats[kind].timestamp < HEARTBEAT_FRESH_S
               for kind in ("SENSOR", "QUEUED_RUN_COORDINATOR"))


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid`` (Linux: /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():  # elsewhere: whether the group still exists at all
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command's ")": state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


class DaemonGuard:
    """Makes sure a Dagster daemon serves the instance while ``imaker ingest`` waits for its
    drops: the running one (``dagster dev``) when there is one, else Dagster's daemon
    started here for the duration, over a code server of its own
    (``imaker_assets.ingest_daemon``; one per instance: a file lock in ``$DAGSTER_HOME``; its
    queue sensor only drives the claims made by `imaker ingest`, see ``INGEST_ONLY_ENV``).
    The runs themselves are Dagster's: the queue sensor requests them, the run queue
    launches them, run monitoring and run retries watch them."""

    def __init__(self, instance: DagsterInstance, home: Path):
        self.instance, self.home = instance, home
        self.proc: subprocess.Popen | None = None
        self.lock = None
        self.started_at = 0.0

    def check(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Dagster daemon started by imaker exited "
                                   f"({self.proc.returncode}); see {self.log}")
            return
        if daemon_serving(self.instance):
            return
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.home / ".imaker-ingest-daemon.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return  # another `imaker ingest` runs a daemon for this instance
        self.lock = lock
        workspace = self.home / "imaker-workspace.yaml"
        if not workspace.is_file() or workspace.read_text() != WORKSPACE:
            workspace.write_text(WORKSPACE)
        self.log = self.home / "logs" / "imaker-ingest-daemon.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        # `dagster-daemon run` over code servers of its own (see imaker_assets.ingest_daemon)
        cmd = [sys.executable, "-m", "imaker_assets.ingest_daemon", str(workspace)]
        env = {**os.environ, INGEST_ONLY_ENV: "1", "DAGSTER_HOME": str(self.home)}
        self.started_at = time.time()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    @staticmethod
    def _wait_for_group(pgid: int, timeout: float = 30.0) -> None:
        """Wait until no process of our daemon's session is left (the code server it
        started can outlive it by a moment, still writing to $DAGSTER_HOME), then return:
        `imaker ingest --once` ends with nothing of its own still running. Processes that
        are only zombies do not count (a container's PID 1 may never reap them). A plain
        wait with a deadline: the OS has no call that waits for a process group."""
        deadline = time.monotonic() + timeout
        while _group_members(pgid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
                return
            time.sleep(0.05)

    def _own_daemon_ids(self) -> set[str]:
        """The daemon ids heartbeating since our daemon started: ours (we started it because
        no daemon served the instance, and hold the lock that makes it the only one)."""
        return {beat.daemon_id for beat in self.instance.get_daemon_heartbeats().values()
                if beat.timestamp >= self.started_at and beat.daemon_id}

    def close(self) -> None:
        ours: set[str] = set()
        if self.proc is not None and self.proc.poll() is None:
            ours = self._own_daemon_ids()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc is not None:
            self._wait_for_group(self.proc.pid)
        # Dagster keeps a stopped daemon's last heartbeats: for HEARTBEAT_FRESH_S they would
        # say "a daemon serves this instance" and the next `imaker ingest` would wait for one
        # that is gone. Forget them when every heartbeat is our stopped daemon's (a daemon
        # started since, e.g. `dagster dev`, keeps its own and everyone's).
        beats = self.instance.get_daemon_heartbeats()
        if len(ours) == 1 and beats and {b.daemon_id for b in beats.values()} <= ours:
            self.instance.wipe_daemon_heartbeats()
        if self.lock is not None:
            self.lock.release()


def outcome(instance: DagsterInstance, store: QueueStore, claim: Claim,
            settings: Settings) -> tuple[bool, str] | None:
    """(succeeded, the line to print) once a drop is archived and its runs are over."""
    where = store.settled(claim.job_id, claim.drop_id)
    if where is None:
        return None
    runs = drop_runs(instance, claim.drop_id)
    newest = runs[0] if runs else None
    if newest is not None and (not newest.is_finished or will_retry(instance, newest)):
        return None  # e.g. nas_copy still running after the manifest archived the bundle
    state, path = where
    if state == "failed":
        stage, reason = store.read_failure(claim.job_id) or ("?", "unknown reason")
        return False, f"{claim.job_id}: failed: {stage}: {reason}"
    if newest is not None and newest.status != DagsterRunStatus.SUCCESS:
        stage, reason = failure_reason(instance, newest)
        return False, f"{claim.job_id}: failed: {stage}: {reason}"
    return True, f"{claim.job_id}: {settings.paths.outputs_dir / claim.job_id}"


#: how long `imaker ingest` keeps its daemon up for the notification sensors (they tick
#: every 5 s; a receiver that does not answer costs them at most a few seconds per URL)
NOTIFY_WAIT_S = 120.0


def wait_for_notifications(instance: DagsterInstance, guard: DaemonGuard,
                           poll_s: float = 0.5, timeout_s: float = NOTIFY_WAIT_S) -> bool:
    """Keep the daemon started by ``imaker ingest`` up until the notification sensors have
    handled every finished `ingest_track` run (their cursors passed its status event).

    Why wait here rather than send from the CLI: the run status sensors are the one place
    that decides and sends (under ``dagster dev`` too), and their cursors make each outcome
    notified once. But this short-lived daemon is stopped as soon as the drops settle,
    usually before the sensors' next tick; the cursor is durable, so the outcome would only
    be notified whenever a daemon next runs. Waiting for the cursors costs a few seconds
    and keeps one mechanism. Returns False if it gave up (the daemon died, or timeout):
    those outcomes are then notified the next time a daemon runs, not lost."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = unhandled_outcomes(instance)
        if not pending:
            return True
        if time.monotonic() > deadline or guard.proc is None or guard.proc.poll() is not None:
            print(f"imaker: {len(pending)} track outcome(s) not notified yet; they will be "
                  "when a Dagster daemon runs next", file=sys.stderr, flush=True)
            return False
        time.sleep(max(poll_s, 1.0))


def _warm_separator(settings: Settings) -> None:
    if settings.service.url:
        return
    from imaker.separator.client import SeparatorClient

    try:
        SeparatorClient.from_settings(settings).ensure_running(preload=True)
    except Exception:  # noqa: BLE001 - only a warm-up: the `stems` step reports any failure
        pass


def ingest_once(instance: DagsterInstance, settings: Settings, out: TextIO | None = None,
                poll_s: float = 0.5) -> int:
    """Claim every ready bundle, let Dagster process each drop as its own `ingest_track`
    run (the queue sensor requests it, the daemon's run queue runs it: see ``DaemonGuard``),
    wait until each is archived and print one line per job; refresh the catalog.
    Returns the number of failed jobs. A bundle claimed by someone else (the sensor of a
    running ``dagster dev``, another ``imaker ingest``) is theirs: not reported here."""
    out = out or sys.stdout
    store = QueueStore.from_settings(settings)
    claimed, rejected, waiting = claim_ready(store, settings, by=f"imaker-ingest:{os.getpid()}")
    failures = 0
    for line in rejected:
        name, _, reason = line.partition(": ")
        print(f"{name}: failed: {reason}", file=out, flush=True)
        failures += 1
    if waiting:
        print(f"{waiting} bundle(s) left in the queues: another drop of the same job is in "
              "progress", file=out, flush=True)
    if not claimed:
        if not rejected:
            print("no bundles waiting in " + ", ".join(str(p) for p in settings.paths.queues.values()),
                  file=out, flush=True)
        return failures
    pending = {claim.drop_id: claim for claim, _ in claimed}
    # the auto-started separation service boots and loads the model while the daemon
    # starts and the first run reaches its `stems` step, instead of after
    threading.Thread(target=_warm_separator, args=(settings,), daemon=True).start()
    guard = DaemonGuard(instance, Path(os.environ.get("DAGSTER_HOME") or "dagster_home").resolve())
    last_check = 0.0
    try:
        while pending:
            if time.monotonic() - last_check > 5.0:
                guard.check()
                last_check = time.monotonic()
            for drop_id, claim in list(pending.items()):
                result = outcome(instance, store, claim, settings)
                if result is None:
                    continue
                del pending[drop_id]
                failures += 0 if result[0] else 1
                print(result[1], file=out, flush=True)
            if pending:
                time.sleep(poll_s)
        # the daemon started here may be driving another `imaker ingest`'s claims (that one
        # found it serving and did not start its own): stop it only once those are settled
        while guard.proc is not None and any(
                c.by.startswith("imaker-ingest:") for c in store.claims()):
            time.sleep(poll_s)
        if guard.proc is not None and settings.notify.urls:
            wait_for_notifications(instance, guard, poll_s)
    finally:
        guard.close()
    refresh_catalog(instance, settings)
    return failures


def remix_runs(instance: DagsterInstance, job_ids: list[str],
               tracks_per_run: int | None = None) -> list[list[str]]:
    """The tracks of each run that re-mixes ``job_ids`` (`variants` + `manifest`), grouped
    as Dagster's asset backfill daemon groups a UI backfill of them
    (``build_run_requests_with_backfill_policies``): by the assets' backfill policy
    (``partitions.REMIX_BACKFILL``, or ``tracks_per_run``), each run a range of partitions
    that are next to each other in the `tracks` partition order."""
    remix = [variants, manifest]
    if tracks_per_run is not None:
        policy = BackfillPolicy.multi_run(tracks_per_run)
        remix = [a.with_attributes(backfill_policy=policy) for a in remix]
    graph = AssetGraph.from_assets(remix)
    order = instance.get_dynamic_partitions(tracks.name)
    with partition_loading_context(dynamic_partitions_store=instance):
        requests = build_run_requests_with_backfill_policies(
            [AssetKeyPartitionKey(a.key, job_id) for a in remix for job_id in job_ids],
            graph, instance)
        runs = []
        for request in requests:
            if request.partition_key is not None:
                runs.append([request.partition_key])
                continue
            start, end = (request.tags[ASSET_PARTITION_RANGE_START_TAG],
                          request.tags[ASSET_PARTITION_RANGE_END_TAG])
            runs.append(order[order.index(start):order.index(end) + 1])
    return sorted(runs, key=lambda run: order.index(run[0]))


def _run_tags(job_ids: list[str]) -> dict[str, str]:
    """A run of one track is tagged with its partition (as the sensor's runs), a run of
    several with the range of partitions (as the backfill daemon's runs)."""
    tags = {"imaker/trigger": "imaker-backfill"}
    if len(job_ids) == 1:
        return {**tags, "imaker/job_id": job_ids[0]}
    return {**tags, ASSET_PARTITION_RANGE_START_TAG: job_ids[0],
            ASSET_PARTITION_RANGE_END_TAG: job_ids[-1]}


def backfill_variants(instance: DagsterInstance, settings: Settings, add_variants: list[str],
                      job_ids: Iterable[str] | None = None, out: TextIO | None = None,
                      tracks_per_run: int | None = None) -> int:
    """Re-mix ``variants`` + ``manifest`` (and their checks) for existing tracks from the
    stored stems, adding ``add_variants``, in runs of many tracks (``remix_runs``). A track
    whose stems were purged, or lack what a variant needs, is separated first in a run of
    its own (said on ``out``): `stems` has no backfill policy, as in a UI backfill. Prints
    one line per track, ``job_id: outputs folder`` or ``job_id: failed: stage: reason``.
    Returns the number of tracks that failed.

    The runs are executed here, one after the other, in this process (Dagster's
    ``materialize`` against the instance, as ``refresh_catalog``): no daemon needed, and
    every run is an ordinary run of the instance, shown in the UI."""
    out = out or sys.stdout
    unknown = [v for v in add_variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if tracks_per_run is not None and tracks_per_run < 1:
        raise ValueError(f"--tracks-per-run must be at least 1 (got {tracks_per_run})")
    resources = build_resources(settings)
    lib = Library.from_settings(settings)
    known = instance.get_dynamic_partitions(tracks.name)
    keys = [k for k in known if k in set(job_ids)] if job_ids else known
    for job_id in job_ids or []:
        if job_id not in known:
            print(f"{job_id}: skipped: not a track (no partition)", file=out, flush=True)
    added = {"config": {"add_variants": list(add_variants)}}
    assets = [*track_assets, *track_checks]
    failures = 0

    def run(selection, job_ids: list[str]):
        result = _materialize(
            assets, instance=instance, selection=AssetSelection.assets(*selection),
            partition_key=job_ids[0] if len(job_ids) == 1 else None,
            resources=resources, raise_on_error=False, tags=_run_tags(job_ids),
            run_config={**QUIET, "ops": {a.key.path[-1]: added for a in selection
                                         if a in (stems, variants)}})
        if result.success:
            return {}
        return track_failures(instance, instance.get_run_by_id(result.run_id), job_ids)

    remix = []
    for job_id in keys:
        if not (lib.track_dir(job_id) / "source.flac").is_file():
            print(f"{job_id}: skipped: no stored source (re-queue its bundle)", file=out, flush=True)
            continue
        if not lib.has_stems(job_id):
            print(f"{job_id}: stems were purged: separating again first", file=out, flush=True)
        elif not pipeline.stems_cover(lib, job_id, pipeline.track_variants(
                settings.output, lib, job_id, add_variants)):
            print(f"{job_id}: the stored stems lack what {', '.join(add_variants)} needs: "
                  "separating first (stored models are reused)", file=out, flush=True)
        else:
            remix.append(job_id)
            continue
        failed = run([stems], [job_id])
        if failed:
            failures += 1
            stage, reason = failed[job_id]
            print(f"{job_id}: failed: {stage}: {reason}", file=out, flush=True)
        else:
            remix.append(job_id)
    for job_ids_of_run in remix_runs(instance, remix, tracks_per_run):
        failed = run([variants, manifest], job_ids_of_run)
        for job_id in job_ids_of_run:
            if job_id in failed:
                failures += 1
                stage, reason = failed[job_id]
                print(f"{job_id}: failed: {stage}: {reason}", file=out, flush=True)
            else:
                print(f"{job_id}: {settings.paths.outputs_dir / job_id}", file=out, flush=True)
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
