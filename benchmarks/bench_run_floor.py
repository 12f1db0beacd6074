#!/usr/bin/env python
"""Dagster's own cost per track run, with nothing in its steps (issue 22's fixed cost).

    python benchmarks/bench_run_floor.py [--runs 20] [--idle-seconds 30] [--keep]

The fixed-cost goal of issue 22 (≤ 1.5 CPU-s per track, outside the separation service)
is measured on `imaker ingest --once` (``bench_ceiling.py`` prints ours). This script
measures the part of it that is Dagster's and not ours: a code location whose
``ingest_track`` has the same steps as ours (the same five assets of one ``tracks`` dynamic
partition, the same two check steps, the in-process executor) with bodies that do
nothing, run the way ours are:

* the daemon ``imaker ingest`` starts (``python -m imaker_assets.ingest_daemon``: Dagster's
  daemon over a code server of its own), on this checkout's ``dagster_home/dagster.yaml``
  (the queued run coordinator, run monitoring and retries, sqlite storage in a temporary
  ``DAGSTER_HOME``) and the run limit of our settings (``MAX_CONCURRENT_RUNS``);
* a sensor that adds a partition per key dropped in a folder and requests its run, as the
  queue sensor does per bundle; ``--runs`` keys dropped at once.

Measured: the CPU of the daemon's whole process tree (daemon, code servers, one process per
run; ``bench_ceiling.TreeSampler`` from ``/proc``) from the drop until every run succeeded,
minus the tree's idle rate over ``--idle-seconds`` before the drop, per run; the run
processes' part apart (their pids from the event log). The step structure is checked against
our real ``ingest_track`` first (the script stops if they differ).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import _cpu_model  # noqa: E402
from bench_ceiling import (ROOT, TreeSampler, between, loadavg, run_timelines,  # noqa: E402
                           stop_group)

JOB = "ingest_track"

#: the code location: our ingest_track's steps, doing nothing
NOOP_LOCATION = textwrap.dedent('''
    import os
    from pathlib import Path

    import dagster as dg

    tracks = dg.DynamicPartitionsDefinition(name="tracks")

    def track_asset(**kw):
        return dg.asset(partitions_def=tracks, **kw)

    @track_asset()
    def source_audio() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    @track_asset(deps=[source_audio])
    def stems() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    @track_asset(deps=[stems])
    def variants() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    @dg.multi_asset_check(specs=[dg.AssetCheckSpec(n, asset=variants, blocking=True) for n in
                                 ("variants_match_source_duration", "variants_do_not_clip",
                                  "variants_are_not_silent")])
    def variants_checks():
        for n in ("variants_match_source_duration", "variants_do_not_clip",
                  "variants_are_not_silent"):
            yield dg.AssetCheckResult(asset_key="variants", check_name=n, passed=True)

    @track_asset(deps=[variants])
    def manifest() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    @dg.asset_check(asset=manifest, blocking=True)
    def manifest_matches_files() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    @track_asset(deps=[manifest])
    def nas_copy() -> dg.MaterializeResult:
        return dg.MaterializeResult()

    ingest_track = dg.define_asset_job(
        "ingest_track", selection=[source_audio, stems, variants, manifest, nas_copy],
        partitions_def=tracks, executor_def=dg.in_process_executor)

    @dg.sensor(job=ingest_track, minimum_interval_seconds=1,
               default_status=dg.DefaultSensorStatus.RUNNING)
    def drops(context):
        folder = Path(os.environ["FLOOR_QUEUE"])
        keys = sorted(p.name for p in folder.iterdir())
        for k in keys:
            (folder / k).unlink()
        if not keys:
            return dg.SkipReason("nothing dropped")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(partition_key=k, run_key=k) for k in keys],
            dynamic_partitions_requests=[tracks.build_add_request(keys)])

    defs = dg.Definitions(assets=[source_audio, stems, variants, manifest, nas_copy],
                          asset_checks=[variants_checks, manifest_matches_files],
                          jobs=[ingest_track], sensors=[drops])
''')


def step_names(job) -> set[str]:
    return {node.name for node in job.graph.node_defs}


def check_shape(location: Path) -> set[str]:
    """The no-op job's steps must be ours (names, so also their number)."""
    import importlib.util

    from imaker_assets.definitions import defs as ours

    spec = importlib.util.spec_from_file_location("noop_location", location)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    real, noop = step_names(ours.resolve_job_def(JOB)), step_names(mod.defs.resolve_job_def(JOB))
    if real != noop:
        raise SystemExit(f"the no-op {JOB} has steps {sorted(noop)}, ours {sorted(real)}: "
                         "update NOOP_LOCATION")
    return real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--idle-seconds", type=float, default=30.0)
    ap.add_argument("--sample-interval", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    from imaker.settings import dagster_env, load_settings

    work = Path(tempfile.mkdtemp(prefix="imaker-run-floor-"))
    home, queue = work / "home", work / "queue"
    home.mkdir()
    queue.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    location = work / "noop_location.py"
    location.write_text(NOOP_LOCATION)
    steps = check_shape(location)
    workspace = work / "workspace.yaml"
    workspace.write_text(f"load_from:\n  - python_file: {location}\n")
    env = {**os.environ, **dagster_env(load_settings()), "DAGSTER_HOME": str(home),
           "FLOOR_QUEUE": str(queue), "DAGSTER_DISABLE_TELEMETRY": "1"}
    os.environ.update({"DAGSTER_HOME": str(home), "MAX_CONCURRENT_RUNS": env["MAX_CONCURRENT_RUNS"]})

    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores; "
          f"{args.runs} runs of {len(steps)} no-op steps ({', '.join(sorted(steps))}); "
          f"MAX_CONCURRENT_RUNS={env['MAX_CONCURRENT_RUNS']}; load {loadavg()}", flush=True)
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    # the storage made (and its schema stamped) here, before the daemon's processes all open
    # it at once (as `imaker ingest` opens it before starting the daemon)
    instance = DagsterInstance.get()
    with open(work / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "imaker_assets.ingest_daemon",
                                   str(workspace)], env=env, cwd=work, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    sampler = TreeSampler({"daemon": daemon.pid}, args.sample_interval)
    sampler.start()
    try:
        deadline = time.time() + args.timeout
        while not instance.get_daemon_heartbeats().get("SENSOR"):  # the daemon is up
            if daemon.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the daemon did not start; see {work / 'daemon.log'}")
            time.sleep(0.5)
        idle_from = time.time()
        time.sleep(args.idle_seconds)
        drop = time.time()
        for i in range(args.runs):
            (queue / f"k{i:04d}").touch()
        done = RunsFilter(statuses=[DagsterRunStatus.SUCCESS])
        ended = RunsFilter(statuses=[DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED])
        while instance.get_runs_count(done) < args.runs:
            if instance.get_runs_count(ended):
                raise SystemExit(f"a run failed; see {home}")
            if time.time() > deadline:
                raise SystemExit(f"timed out; see {home}")
            time.sleep(0.2)
        end = max(r.end_time or 0 for r in instance.get_run_records(done))
        run_pids = {r["pid"] for r in run_timelines(home) if r["pid"] is not None}
    finally:
        sampler.stop()
        stop_group(daemon, signal.SIGINT)  # how DaemonGuard stops it: the code servers with it

    tree = sampler.series(daemon.pid)
    idle_rate = between(tree, idle_from, drop) / (drop - idle_from)
    busy = between(tree, drop, end)
    runs_cpu = sum(between(sampler.series(pid), drop, end) for pid in run_pids)
    per_run = (busy - idle_rate * (end - drop)) / args.runs
    print(f"wall, drop -> last run succeeded: {end - drop:.1f} s "
          f"({(end - drop) / args.runs:.2f} s per run)")
    print(f"idle daemon tree: {idle_rate * 60:.2f} CPU-s per minute")
    print(f"CPU per run, whole tree minus idle: {per_run:.2f} CPU-s "
          f"(run process {runs_cpu / args.runs:.2f}, daemon + code servers "
          f"{per_run - runs_cpu / args.runs:.2f}; {len(run_pids)} run processes found)")
    print("issue 22's goal for a whole track outside the separation service: 1.5 CPU-s")
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
