"""The compose deployment for real: build the base-image stand-ins and both images, start
docker/docker-compose.yml as it is (CPU host, the tiny model in the models volume, images
tagged :e2e, project `imaker-e2e`), then use it as a user would: drop bundles into the
queue volume, kill a run container during `stems`, crash the separation service during a
separation, restart the daemon during a run, `down` + `up`. After every case each bundle is
processed exactly once: its manifest, its archive in done/, exactly one successful
`ingest_track` run for its partition (Dagster's GraphQL API), nothing left in working/,
nothing in failed/.

Runs as root where a Docker engine can run (CI: scripts/setup.sh --test installs and starts
it through scripts/setup-docker.sh); skipped elsewhere. Images and the debootstrap base are
kept between runs (layer cache); volumes and containers are removed. Phase times are
printed. ~10 min cold on 2 cores. IMAKER_E2E_KEEP=1 leaves the stack running afterwards."""

from __future__ import annotations

import os
import socket
import stat
import time
import urllib.request

import pytest

import compose_stack
from conftest import make_audio
from compose_stack import (APP_IMAGE, DAGSTER_IMAGE, PYTHON_STANDIN, Stack, host_addresses,
                           TERMINAL, log, proc_uid, run, unavailable_reason)
from imaker.devmodel import build_model_repo

SHORT_S = 8      # a track the tiny model separates in a few seconds
LONG_S = 90      # long enough to kill things while its stems step runs


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pytestconfig):
    compose_stack.REPORTER = pytestconfig.pluginmanager.getplugin("terminalreporter")
    compose_stack.CAPMAN = pytestconfig.pluginmanager.getplugin("capturemanager")
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    s = Stack(tmp_path_factory.mktemp("compose") / "docker")
    s.write_env()
    foreign = s.foreign_deployment()
    if foreign:
        pytest.skip(f"a real instrumental-maker deployment uses this engine ({foreign}); "
                    "the test would share its fixed volume names")
    t0 = time.time()
    s.phase("clean", s.clean)
    s.phase("base images (stand-ins)", s.build_standins)
    s.phase("image dagster", s.build_image, "dagster", DAGSTER_IMAGE)
    s.phase("image app", s.build_image, "app", APP_IMAGE)
    s.separator = s.has_separator_command()
    if not s.separator:
        log("the app image has no `imaker separator` yet: separator service cases skip")
    media = tmp_path_factory.mktemp("media")
    s.short = make_audio(media / "short.m4a", SHORT_S)
    s.long = make_audio(media / "long.m4a", LONG_S, freq=330)
    model = build_model_repo(tmp_path_factory.mktemp("model"), "tiny_htdemucs")
    s.phase("compose create + model volume", s.create, model)
    services = ("postgres", "user_code", "webserver", "daemon") + (("separator",) if s.separator else ())
    # the daemon's probe runs every 30 s: it is asserted healthy by the second test, the
    # first bundle does not wait for its first probe
    s.phase("compose up (healthy)", lambda: (s.compose("up", "-d"),
                                             s.wait_healthy(300, services, starting_ok=("daemon",))))
    s.services = services
    yield s
    s.times["total"] = round(time.time() - t0, 1)
    log("phase times: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.times.items()))
    if os.environ.get("IMAKER_E2E_KEEP") == "1":
        log(f"kept running: UI http://127.0.0.1:{s.port}, compose dir {s.work}")
    else:
        s.phase("clean", s.clean)


def _case(stack, name, job_ids, timeout=420):
    stack.wait_for(f"{name}: {job_ids} processed", lambda: stack.settled(job_ids), timeout, 2)
    problems = stack.exactly_once_report(job_ids)
    assert not problems, f"{name}: " + "; ".join(problems) + "\n" + stack.diagnose()


def test_one_bundle(stack):
    t0 = time.time()
    stack.drop(["one"], stack.short)
    _case(stack, "one bundle", ["one"])
    stack.times["case one bundle"] = round(time.time() - t0, 1)
    log(f"case one bundle: {time.time() - t0:.1f} s")


def test_ui_on_localhost_only_and_containers_not_root(stack):
    stack.wait_healthy(120, stack.services)   # the daemon too, now
    # the UI is published on 127.0.0.1 only
    port_map = run([stack.docker, "port", stack.container("webserver"), "3000"]).stdout.split()
    assert port_map and all(p.startswith("127.0.0.1:") for p in port_map), port_map
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.port}/server_info", timeout=10) as resp:
        assert resp.status == 200
    for addr in host_addresses():
        with socket.socket() as sock:
            sock.settimeout(3)
            assert sock.connect_ex((addr, stack.port)) != 0, f"UI answers on {addr}"
    # every container of the stack runs as a non-root user (their init and main process)
    for svc in stack.services:
        cid = stack.container(svc)
        pid = int(run([stack.docker, "inspect", "-f", "{{.State.Pid}}", cid]).stdout)
        assert proc_uid(pid) != 0, f"{svc} runs as root"
        children = run(["pgrep", "-P", str(pid)], check=False).stdout.split()
        for child in children:
            assert proc_uid(int(child)) != 0, f"{svc}: pid {child} runs as root"
    # run containers too (the image's user)
    user = run([stack.docker, "image", "inspect", "-f", "{{.Config.User}}", APP_IMAGE]).stdout.strip()
    assert user not in ("", "0", "root"), user


def test_outputs_readable_by_a_media_server(stack):
    """Files 0644 and folders 0755 (UMASK=022), owned by PUID:PGID, readable by another
    uid (a Jellyfin/Navidrome container)."""
    out = stack.outputs / "one"
    for p in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = 0o755 if p.is_dir() else 0o644
        assert mode == want, f"{p.relative_to(stack.outputs)}: {oct(mode)} (want {oct(want)})"
        assert (p.stat().st_uid, p.stat().st_gid) == (1000, 1000), p
    reader = run([stack.docker, "run", "--rm", "-u", "4242:4242", "-v", "imaker-outputs:/o:ro",
                  PYTHON_STANDIN, "sh", "-c",
                  "find /o/one -type f | while read f; do cat \"$f\" >/dev/null || exit 1; done"
                  " && find /o/one -type f | wc -l"], check=False)
    assert reader.returncode == 0 and int(reader.stdout.strip()) >= 3, reader.stderr


def test_three_bundles_at_once(stack):
    t0 = time.time()
    ids = ["three_a", "three_b", "three_c"]
    stack.drop(ids, stack.short)
    _case(stack, "three at once", ids, timeout=600)
    stack.times["case three bundles"] = round(time.time() - t0, 1)
    log(f"case three bundles: {time.time() - t0:.1f} s")


def test_a_run_launched_from_the_ui_waits_for_the_tracks_active_run(stack):
    """One run per track at a time, UI runs included: a run of the track's partition
    launched as the UI's launchpad does (GraphQL launchRun, tags = the partition only: no
    imaker/* tags) while the sensor's run is separating stays queued until that run ends."""
    t0 = time.time()
    stack.drop(["uiwait"], stack.long)
    first = stack.wait_run_step("uiwait", "stems")
    data = stack.graphql(
        "mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename"
        " ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }",
        {"p": {"selector": {"repositoryLocationName": "instrumental_maker",
                            "repositoryName": "__repository__", "jobName": "ingest_track"},
               "mode": "default", "runConfigData": {},
               "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "uiwait"}]}}})
    assert data["launchRun"]["__typename"] == "LaunchRunSuccess", data
    ui_id = data["launchRun"]["run"]["runId"]

    def by_id():
        return {r["runId"]: r for r in stack.runs_of("uiwait")}

    ui = by_id()[ui_id]
    assert "imaker/job_id" not in ui["tags"] and "imaker/drop_id" not in ui["tags"], ui["tags"]
    # while the sensor's run works, the UI's run waits in the run queue
    while by_id()[first["runId"]]["status"] not in TERMINAL:
        assert by_id()[ui_id]["status"] in ("QUEUED", "NOT_STARTED"), by_id()
        time.sleep(1)
    stack.wait_for("the UI's run over", lambda: by_id()[ui_id]["status"] in TERMINAL, 420, 2)
    runs = by_id()
    assert runs[first["runId"]]["status"] == "SUCCESS" and runs[ui_id]["status"] == "SUCCESS", runs
    assert runs[ui_id]["startTime"] >= runs[first["runId"]]["endTime"], runs
    done = sorted(p.name for p in (stack.data / "archive" / "done").glob("job_uiwait*"))
    assert done == ["job_uiwait"], done
    assert (stack.outputs / "uiwait" / "manifest.json").is_file()
    stack.times["case UI run waits"] = round(time.time() - t0, 1)
    log(f"case UI run waits: {time.time() - t0:.1f} s")


def test_kill_run_container_during_stems(stack):
    t0 = time.time()
    stack.drop(["killrun"], stack.long)
    victim = stack.wait_run_step("killrun", "stems")
    cid = stack.wait_for("the run's container", lambda: stack.run_container(victim["runId"]), 30)
    run([stack.docker, "kill", cid])
    log(f"killed run container {cid[:12]} (run {victim['runId'][:8]}) during stems")
    _case(stack, "run container killed", ["killrun"], timeout=600)
    runs = stack.runs_of("killrun")
    assert any(r["runId"] == victim["runId"] and r["status"] == "FAILURE" for r in runs), runs
    stack.times["case kill run container"] = round(time.time() - t0, 1)
    log(f"case kill run container: {time.time() - t0:.1f} s")


def test_separator_crash_during_separation(stack):
    assert stack.separator, "the app image has no `imaker separator` command"
    t0 = time.time()
    stack.drop(["killsep"], stack.long)
    stack.wait_run_step("killsep", "stems")
    stack.wait_for("the service separating", lambda: stack.separator_health().get("active", 0) >= 1,
                   120, 0.5)
    cid = stack.container("separator")

    def restarts():
        return int(run([stack.docker, "inspect", "-f", "{{.RestartCount}}", cid]).stdout)

    before = restarts()
    pid = int(run([stack.docker, "inspect", "-f", "{{.State.Pid}}", cid]).stdout)
    os.kill(pid, 9)                   # a crash (OOM kill), not `docker stop`: restart policy applies
    log("separator crashed (SIGKILL) during a separation")
    stack.wait_for("separator restarted by Docker and healthy again",
                   lambda: restarts() > before and stack.service_states().get("separator") == "healthy",
                   180, 2)
    _case(stack, "separator crashed", ["killsep"], timeout=600)
    stack.times["case separator crash"] = round(time.time() - t0, 1)
    log(f"case separator crash: {time.time() - t0:.1f} s")


def test_restart_daemon_during_run(stack):
    t0 = time.time()
    stack.drop(["restartd"], stack.long)
    stack.wait_run_step("restartd", "stems")
    stack.compose("restart", "daemon")
    log("daemon restarted during a run")
    _case(stack, "daemon restarted", ["restartd"], timeout=600)
    stack.times["case restart daemon"] = round(time.time() - t0, 1)
    log(f"case restart daemon: {time.time() - t0:.1f} s")


def test_down_up_keeps_runs_partitions_and_outputs(stack):
    t0 = time.time()
    before_runs = {r["runId"]: r["status"] for r in stack.runs()}
    before_parts = set(stack.partitions())
    manifests = sorted(p.parent.name for p in stack.outputs.glob("*/manifest.json"))
    assert {"one", "three_a", "three_b", "three_c"} <= before_parts
    stack.compose("down", "-t", "30")
    stack.compose("up", "-d")
    stack.wait_healthy(300, stack.services, starting_ok=("daemon",))
    after_runs = {r["runId"]: r["status"] for r in stack.runs()}
    assert {k: after_runs.get(k) for k in before_runs} == before_runs
    assert before_parts <= set(stack.partitions())
    assert sorted(p.parent.name for p in stack.outputs.glob("*/manifest.json")) == manifests
    # and it still processes
    stack.drop(["after_up"], stack.short)
    _case(stack, "after down/up", ["after_up"])
    stack.wait_healthy(120, stack.services)
    stack.times["case down/up"] = round(time.time() - t0, 1)
    log(f"case down/up: {time.time() - t0:.1f} s")
