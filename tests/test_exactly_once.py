"""Exactly once under kills, restarts and concurrent invocations, in the embedded default
(sqlite, `dagster dev`, the auto-started separation service): every bundle drop ends in
done/ or failed/ once, with exactly one successful `ingest_track` run per drop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter, materialize

from conftest import claim_tags, make_audio, stop_separator, write_bundle
from dagster_server import dagster_server, free_port
from imaker.separator.client import SeparatorClient
from imaker.settings import load_settings
from imaker_assets.operations import daemon_serving
from resources import build_resources

ROOT = Path(__file__).parents[1]


def _track_runs(instance, job_id):
    return instance.get_runs(filters=RunsFilter(job_name="ingest_track",
                                                tags={"dagster/partition": job_id}))


def _assert_exactly_once(instance, settings, job_ids):
    for job_id in job_ids:
        runs = _track_runs(instance, job_id)
        ok = [r for r in runs if r.status == DagsterRunStatus.SUCCESS]
        assert len(ok) == 1, (job_id, [(r.run_id, r.status) for r in runs])
        assert len({r.tags["imaker/drop_id"] for r in runs}) == 1, job_id
        assert (settings.paths.archive_dir / "done" / f"job_{job_id}").is_dir()
        assert json.loads((settings.paths.outputs_dir / job_id / "manifest.json").read_text())["job_id"] == job_id
    assert list(settings.paths.working_dir.iterdir()) == []
    assert not settings.paths.archive_dir.joinpath("failed").exists() or \
        list((settings.paths.archive_dir / "failed").iterdir()) == []


def _wait(predicate, timeout, what, every=1.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _imaker(*args, **kw):
    exe = Path(sys.executable).with_name("imaker")
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=os.environ.copy(), **kw)


def _imaker_ready(*args):
    """`imaker ARGS` with its imports done ahead: it starts when a line is written to it."""
    code = ("import sys; from imaker import cli; import imaker_assets.operations; "
            "print('ready', flush=True); sys.stdin.readline(); "
            f"sys.exit(cli.main({list(args)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=os.environ.copy())
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def test_two_ingest_once_at_the_same_time_process_each_job_once(imaker_env, tmp_path):
    """Observation 3: two `imaker ingest --once` one second apart on the same queue."""
    settings = load_settings()
    long = make_audio(tmp_path / "long.m4a", 20.0)
    short = make_audio(tmp_path / "short.m4a", 5.0, freq=330)
    write_bundle(settings.paths.queue_other, "race_long", long)
    write_bundle(settings.paths.queue_other, "race_s1", short)
    first = _imaker("ingest", "--once")
    time.sleep(1.0)
    write_bundle(settings.paths.queue_other, "race_s2", short)   # only the second one sees it
    second = _imaker("ingest", "--once")
    outs = [p.communicate(timeout=600) for p in (first, second)]
    codes = [first.returncode, second.returncode]
    assert codes == [0, 0], outs
    lines = [line for out, _ in outs for line in out.splitlines() if ": " in line
             and line.split(": ", 1)[0].startswith("race_")]
    reported = sorted(line.split(": ", 1)[0] for line in lines)
    assert reported == ["race_long", "race_s1", "race_s2"], outs      # each once, by one of them
    assert not [line for line in lines if "failed" in line], outs
    _assert_exactly_once(DagsterInstance.get(), settings, ["race_long", "race_s1", "race_s2"])


def test_fifo_job_json_fails_at_once_in_ingest_once(imaker_env, source_m4a):
    """Observation 6: a FIFO as job.json never hangs the CLI or the sensor."""
    settings = load_settings()
    folder = write_bundle(settings.paths.queue_other, "fifo_cli", source_m4a)
    (folder / "job.json").unlink()
    os.mkfifo(folder / "job.json")
    start = time.monotonic()
    proc = _imaker("ingest", "--once")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert "fifo_cli: failed: source_audio: job.json is not a regular file" in out, out + err
    assert time.monotonic() - start < 120
    # the daemon it started is stopped and forgotten: the next `imaker ingest` starts its
    # own at once instead of waiting for the stale heartbeats to age
    assert not daemon_serving(DagsterInstance.get())
    failed = settings.paths.archive_dir / "failed" / "job_fifo_cli"
    error = json.loads((failed / "error.json").read_text())
    assert "not a regular file" in error["error"]

    # repaired, then `imaker retry` puts it back and the next pass processes it
    (failed / "job.json").unlink()
    (failed / "job.json").write_text(json.dumps({
        "schema_version": 1, "job_id": "fifo_cli", "source_type": "local", "title": "T",
        "artist": "A", "audio": "audio.m4a"}))
    retry = _imaker("retry", "--failed")
    out, err = retry.communicate(timeout=60)
    assert retry.returncode == 0 and "fifo_cli: queued again" in out, out + err
    again = _imaker("ingest", "--once")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and f"fifo_cli: {settings.paths.outputs_dir / 'fifo_cli'}" in out, out + err
    history = list((settings.paths.archive_dir / "done" / "job_fifo_cli" / ".imaker" / "history").iterdir())
    assert len(history) == 1 and "not a regular file" in history[0].read_text()


def _engine_pid(instance, run_id):
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        found = re.search(r"Started process for run \(pid: (\d+)\)", entry.message or "")
        if found:
            return int(found.group(1))
    return None


def _step_started(instance, run_id, step):
    return any(e.step_key == step for e in
               instance.all_logs(run_id, of_type=DagsterEventType.STEP_START))


def test_dagster_dev_killed_run_worker_is_retried_by_dagster_once(imaker_env, tmp_path):
    """Observations 2 and 4: kill -9 a run worker during `stems` under `dagster dev`. Dagster
    marks the run failed, frees its pool slot and retries it; the bundle is processed by
    exactly one successful run, and no slot stays claimed."""
    settings = load_settings()
    audio = make_audio(tmp_path / "long.m4a", 60.0)
    with dagster_server(["dagster", "dev"], tmp_path / "dagster_dev.log") as (proc, url):
        instance = DagsterInstance.get()
        write_bundle(settings.paths.queue_other, "killed", audio)
        _wait(lambda: _track_runs(instance, "killed"), 120, "the sensor's run")
        [run] = _track_runs(instance, "killed")
        _wait(lambda: _step_started(instance, run.run_id, "stems"), 180, "stems to start", 0.3)
        pid = _engine_pid(instance, run.run_id)
        assert pid, "run worker pid not logged"
        os.kill(pid, signal.SIGKILL)
        done = settings.paths.archive_dir / "done" / "job_killed"
        log = tmp_path / "dagster_dev.log"
        _wait(lambda: done.exists() or (settings.paths.archive_dir / "failed").joinpath(
            "job_killed").exists() or proc.poll() is not None, 420, "the bundle to settle", 2)
        assert done.exists(), log.read_text()[-4000:]
        _wait(lambda: _track_runs(instance, "killed")[0].is_finished, 120, "nas_copy")
        runs = _track_runs(instance, "killed")
        assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE]
        assert runs[0].tags.get("dagster/parent_run_id") == run.run_id   # Dagster's retry
        _assert_exactly_once(instance, settings, ["killed"])

        def slots_free():
            info = instance.event_log_storage.get_concurrency_info("gpu")
            return not info.claimed_slots and not info.pending_steps
        _wait(slots_free, 120, "the gpu pool slots to be freed", 2)

        # `imaker ingest --once` beside the running `dagster dev`: it claims, dagster dev's
        # daemon runs the track, the CLI reports it; it starts no daemon of its own. Both
        # may claim a new bundle: when dagster dev's queue sensor scans before the CLI has
        # claimed, the track is the sensor's and the CLI has nothing to report. So the CLI
        # is started ahead (its imports take seconds on a loaded machine) and let go right
        # after a sensor tick; if the sensor still wins, the scenario is tried again.
        log = tmp_path / "dagster_dev.log"
        beside: list[str] = []
        for attempt in range(4):
            job = f"beside{attempt}"
            beside.append(job)
            cli = _imaker_ready("ingest", "--once")
            ticks = log.read_text().count("Sensor queue_sensor skipped")
            _wait(lambda: log.read_text().count("Sensor queue_sensor skipped") > ticks, 60,
                  "a queue sensor tick", 0.1)
            write_bundle(settings.paths.queue_other, job, make_audio(tmp_path / f"{job}.m4a", 4.0))
            out, err = cli.communicate("go\n", timeout=300)
            assert cli.returncode == 0, out + err
            if f"{job}: {settings.paths.outputs_dir / job}" in out:
                break
            assert out.startswith("no bundles waiting"), out + err
            _wait(lambda: any(r.status == DagsterRunStatus.SUCCESS
                              for r in _track_runs(instance, job)), 180, "the sensor's track")
        else:
            raise AssertionError("dagster dev's sensor claimed every bundle before the CLI")
        home = Path(os.environ["DAGSTER_HOME"])
        assert not (home / "logs" / "imaker-ingest-daemon.log").exists()
        assert daemon_serving(instance)  # dagster dev's heartbeats are not ours to forget
        _assert_exactly_once(instance, settings, ["killed", *beside])


def _materialize_in_thread(job_id, results):
    settings = load_settings()
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", [job_id])
    from imaker_assets.assets import track_assets

    results.append(materialize(track_assets, partition_key=job_id, instance=instance,
                               resources=build_resources(settings), raise_on_error=False,
                               tags=claim_tags(job_id)))


def test_separation_service_killed_mid_separation_is_retried(imaker_env, tmp_path, monkeypatch):
    """The service dies during a separation: the step fails with a clear message and is
    retried (the bundle stays claimed); the retry starts a new service and succeeds."""
    import imaker_assets.assets as assets_mod

    monkeypatch.setattr(assets_mod, "SERVICE_RETRY_WAIT_S", 1)
    port = free_port()
    monkeypatch.setenv("SEPARATOR_PORT", str(port))
    settings = load_settings()
    client = SeparatorClient(url=None, port=port)
    client.ensure_running()
    first_pid = client.health()["pid"]
    write_bundle(settings.paths.queue_other, "sepkill", make_audio(tmp_path / "a.m4a", 60.0))
    results: list = []
    worker = threading.Thread(target=_materialize_in_thread, args=("sepkill", results))
    worker.start()
    try:
        _wait(lambda: (client.health() or {}).get("active", 0) > 0, 180, "the separation", 0.2)
        os.kill(first_pid, signal.SIGKILL)
    finally:
        worker.join(timeout=600)
    [result] = results
    assert result.success
    assert client.health()["pid"] != first_pid          # a new service did the retry
    logs = DagsterInstance.get().all_logs(result.run_id)
    assert any("went away during the separation of sepkill" in (e.user_message or "")
               for e in logs)
    assert [e.step_key for e in logs if e.dagster_event is not None
            and e.dagster_event.event_type == DagsterEventType.STEP_UP_FOR_RETRY] == ["stems"]
    assert (settings.paths.archive_dir / "done" / "job_sepkill").is_dir()
    assert (settings.paths.stems_dir / "sepkill" / "stems.json").is_file()
    stop_separator(port)


def test_unreachable_service_fails_the_track_with_its_address(imaker_env, source_m4a, monkeypatch):
    import imaker_assets.assets as assets_mod
    from dagster import build_sensor_context

    from imaker_assets.definitions import build_defs
    from sensors import queue_sensor

    monkeypatch.setattr(assets_mod, "SERVICE_RETRY_WAIT_S", 0)
    port = free_port()
    monkeypatch.setenv("SEPARATOR_URL", f"http://127.0.0.1:{port}")
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "nosvc", source_m4a)
    results: list = []
    _materialize_in_thread("nosvc", results)
    assert not results[0].success
    assert (settings.paths.working_dir / "job_nosvc").is_dir()   # transient: not archived by a step
    # the run is over and will not be retried (a step failure): the sensor settles the drop
    queue_sensor(build_sensor_context(instance=DagsterInstance.get(),
                                      definitions=build_defs(settings),
                                      resources=build_resources(settings)))
    error = json.loads((settings.paths.archive_dir / "failed" / "job_nosvc" / "error.json").read_text())
    assert error["stage"] == "stems"
    assert f"the separation service at http://127.0.0.1:{port} is not reachable" in error["error"]


def test_every_track_run_has_the_nas_copy_retry_policy(imaker_env):
    """Observation 7: one path, so nas_copy always runs with its retry policy."""
    from imaker_assets.definitions import build_defs
    from imaker_assets.nas import NAS_RETRY_POLICY

    job = build_defs(load_settings()).resolve_job_def("ingest_track")
    node = job.graph.node_named("nas_copy")
    assert node.retry_policy == NAS_RETRY_POLICY or node.definition.retry_policy == NAS_RETRY_POLICY
    assert "ingest_batch" not in [j.name for j in build_defs(load_settings()).resolve_all_job_defs()]


def test_the_daemon_guard_waits_for_every_process_of_its_daemons_group():
    """`imaker ingest --once` returns only when nothing it started is left: the daemon's
    code server can outlive the daemon by a moment (still writing to $DAGSTER_HOME). A
    group whose leader exited and whose child still runs is waited for; zombies are not."""
    from imaker_assets.operations import DaemonGuard, _group_members

    proc = subprocess.Popen(["sh", "-c", "sleep 0.6 & exit 0"], start_new_session=True)
    proc.wait()
    assert _group_members(proc.pid), "the child left in the group"
    start = time.monotonic()
    DaemonGuard._wait_for_group(proc.pid)
    assert _group_members(proc.pid) == [] and time.monotonic() - start > 0.3
    # a child that never ends is killed at the deadline
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & exit 0"], start_new_session=True)
    proc.wait()
    DaemonGuard._wait_for_group(proc.pid, timeout=0.3)
    _wait(lambda: not _group_members(proc.pid), 10, "the killed child", 0.05)


def test_the_ingest_daemon_keeps_its_code_server(imaker_env):
    """The daemon `imaker ingest` starts serves the instance from code servers that live as
    long as it does (`imaker_assets.ingest_daemon`). A `dagster-daemon run` on a
    python_module workspace replaced its code server every 60 s (a new process loading the
    code location: about 2 CPU-s a minute here). Over 75 s the one code server stays, and
    closing the guard leaves no process of its group behind."""
    from dagster import DagsterInstance
    from dagster_server import process_tree

    from imaker_assets.operations import DaemonGuard, _group_members, daemon_serving

    home = Path(os.environ["DAGSTER_HOME"])
    with DagsterInstance.get() as instance:
        guard = DaemonGuard(instance, home)
        guard.check()
        try:
            assert guard.proc is not None, "no daemon served the instance: the guard starts one"
            _wait(lambda: daemon_serving(instance), 90, "the daemon's heartbeats")

            def code_servers() -> set[int]:
                return {pid for pid, cmd in process_tree(guard.proc.pid).items()
                        if "api grpc" in cmd}

            first = code_servers()
            assert len(first) == 1, process_tree(guard.proc.pid)
            seen = set(first)
            deadline = time.monotonic() + 75
            while time.monotonic() < deadline:
                seen |= code_servers()
                time.sleep(1)
                guard.check()  # raises if the daemon exited
            assert seen == first, f"code servers started: {sorted(seen - first)}"
        finally:
            pgid = guard.proc.pid if guard.proc is not None else None
            guard.close()
    assert pgid is not None and _group_members(pgid) == []
