#!/usr/bin/env python
"""Backfill of a new variant over many tracks (issue 22, point 5): one Dagster run per track
against runs of many partitions (the assets' backfill policy).

    python benchmarks/bench_backfill.py [--tracks 100] [--seconds 8] [--per-run 8]
                                        [--json out.json] [--keep]

``--tracks`` generated songs (``imaker dev-song``, seeds from 0; a song whose ingest fails
is left out and said, and the next one taken) are ingested once, not timed: each by a one-partition run of the whole chain as the queue sensor's (its drop
claimed, every asset and check), separated by the **oracle model** (``imaker/oracle.py``:
the song's known stems through the product's stems store, no network), AAC 256k outputs.
The instance is SQLite in a temporary ``DAGSTER_HOME`` (README command 1's setup).

Then ``imaker backfill --variants drums_only`` (``operations.backfill_variants``) runs
twice from the same copy of that state (data folder and instance restored in between):

* (a) ``--tracks-per-run 1``: one run per track, what `imaker backfill` did before;
* (b) the default: runs of ``--per-run`` tracks (``partitions.TRACKS_PER_BACKFILL_RUN``).

Both re-mix and encode the same variants of every track (instrumental, no drums, drums
only) and check them; nothing is separated in either (the stems are stored). Printed per
mode: runs created (runs of the instance tagged ``imaker/trigger=imaker-backfill``), wall
time, CPU-seconds of this process and of its children (ffmpeg; ``getrusage``), and the
ratios (a)/(b). The catalog refresh at the end of each backfill is in both figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ORACLE = "oracle"
TRIGGER = {"imaker/trigger": "imaker-backfill"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ingest(instance, settings, job_ids: list[str], wanted: int) -> list[str]:
    """Each track through a one-partition run of the whole chain, as the sensor's, until
    ``wanted`` succeeded; a track that fails (a generated song whose AAC variant overshoots
    0 dBFS fails the clipping check) is forgotten, and said. Returns the ingested ones."""
    from imaker_assets.operations import failure_reason, forget

    from dagster import materialize

    from imaker.queues import QueueStore
    from imaker_assets.assets import DROP_TAG, track_assets
    from imaker_assets.checks import track_checks
    from imaker_assets.operations import QUIET
    from resources import build_resources

    store = QueueStore.from_settings(settings)
    jobs = {j.job_id: j for j in store.discover()}
    resources = build_resources(settings)
    done = []
    for job_id in job_ids:
        if len(done) == wanted:
            break
        claim = store.claim(jobs[job_id], by="bench_backfill")
        instance.add_dynamic_partitions("tracks", [job_id])
        result = materialize([*track_assets, *track_checks], partition_key=job_id,
                             instance=instance, resources=resources, run_config=QUIET,
                             raise_on_error=False,
                             tags={"imaker/job_id": job_id, DROP_TAG: claim.drop_id})
        if result.success:
            done.append(job_id)
            continue
        stage, reason = failure_reason(instance, instance.get_run_by_id(result.run_id))
        print(f"{job_id}: left out: ingest failed: {stage}: {reason}", flush=True)
        forget(instance, settings, job_id, outputs=True)
    if len(done) < wanted:
        raise SystemExit(f"only {len(done)} of {wanted} songs ingested")
    return done


def backfill(work: Path, pristine: Path, per_run: int | None, n: int) -> dict:
    """Restore the ingested state, then one `imaker backfill --variants drums_only`."""
    from dagster import DagsterInstance, RunsFilter

    from imaker.settings import load_settings
    from imaker_assets import operations

    for name in ("data", "dagster_home"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(pristine / name, work / name, symlinks=True)
    settings = load_settings()
    with DagsterInstance.get() as instance:
        lines: list[str] = []

        class Out:
            def write(self, text):
                lines.append(text)

            def flush(self):
                pass

        c, t = cpu(), time.perf_counter()
        failed = operations.backfill_variants(instance, settings, ["drums_only"],
                                              out=Out(), tracks_per_run=per_run)
        wall, used = time.perf_counter() - t, cpu() - c
        runs = instance.get_runs(filters=RunsFilter(tags=TRIGGER))
        done = sum(1 for line in "".join(lines).splitlines()
                   if ": failed" not in line and ": skipped" not in line)
        if failed or done != n:
            raise SystemExit(f"backfill failed: {''.join(lines)}")
        return {"runs": len(runs), "wall_s": wall, "cpu_s": used}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=100)
    p.add_argument("--seconds", type=float, default=8.0, help="length of each generated song")
    p.add_argument("--per-run", type=int, default=None,
                   help="tracks per run in (b) (default: the backfill policy's)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()

    from imaker import devsong, oracle
    from imaker_assets.partitions import TRACKS_PER_BACKFILL_RUN

    per_run = args.per_run or TRACKS_PER_BACKFILL_RUN
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="imaker-bench-backfill-"))
    print(f"{cores} cores; load average at start {loadavg()}; work {work}", flush=True)
    t = time.perf_counter()
    # a few more songs than tracks: the odd generated song fails ingest (left out, said)
    songs = devsong.generate(work / "songs", count=args.tracks + args.tracks // 8 + 2,
                             seconds=args.seconds, processes=cores)
    repo = work / "models"
    oracle.write_spec(repo, [work / "songs"], ORACLE)
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = dict(IMAKER_DATA=str(work / "data"), DAGSTER_HOME=str(home), IMAKER_ENV_FILE="",
               DEMUCS_MODEL=ORACLE, DEMUCS_MODEL_REPO=str(repo), DEMUCS_DEVICE="cpu",
               SEPARATOR_PORT=str(free_port()), OUTPUT_AUDIO_FORMAT="m4a",
               OUTPUT_AUDIO_BITRATE="256k", HF_HUB_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    os.environ.update(env)
    for key in ("SEPARATOR_URL", "GENERATE_DRUMS_ONLY_VARIANT", "GENERATE_NO_DRUMS_VARIANT",
                "PRESERVE_STEMS", "NOTIFY_URLS", "NAS_SYNC_ENABLED"):
        os.environ.pop(key, None)

    from dagster import DagsterInstance

    from imaker.settings import load_settings
    from imaker.separator.client import SeparatorClient

    settings = load_settings()
    job_ids = []
    for song in songs:
        devsong.queue_song(song, settings.paths.queue_other, fmt="flac", title=song.name)
        job_ids.append(song.name)
    client = SeparatorClient.from_settings(settings)
    try:
        with DagsterInstance.get() as instance:
            ingest(instance, settings, job_ids, args.tracks)
        print(f"{args.tracks} x {args.seconds:g} s songs generated and ingested in "
              f"{time.perf_counter() - t:.0f} s (not timed)", flush=True)
        pristine = work / "pristine"
        for name in ("data", "dagster_home"):
            shutil.copytree(work / name, pristine / name, symlinks=True)

        load_a = loadavg()
        one = backfill(work, pristine, 1, args.tracks)
        load_b = loadavg()
        many = backfill(work, pristine, per_run, args.tracks)
        load_end = loadavg()
    finally:
        health = client.health()  # the separation service the runs started
        if health and health.get("pid"):
            os.kill(int(health["pid"]), signal.SIGTERM)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    n = args.tracks
    print(f"\nbackfill --variants drums_only over {n} tracks of {args.seconds:g} s "
          f"(oracle stems, AAC 256k, 3 variants each), in-process runs on SQLite")
    print(f"  (a) one run per track:      {one['runs']:4d} runs  wall {one['wall_s']:7.1f} s  "
          f"CPU {one['cpu_s']:7.1f} s  ({one['wall_s'] / n:.2f} s/track)  load {load_a}")
    print(f"  (b) {per_run} tracks per run:       {many['runs']:4d} runs  wall "
          f"{many['wall_s']:7.1f} s  CPU {many['cpu_s']:7.1f} s  ({many['wall_s'] / n:.2f} "
          f"s/track)  load {load_b}")
    print(f"  runs (b) {many['runs']} <= ceil({n}/{per_run}) = {math.ceil(n / per_run)}: "
          f"{many['runs'] <= math.ceil(n / per_run)}")
    print(f"  ratio (a)/(b): wall {one['wall_s'] / many['wall_s']:.2f}x, "
          f"CPU {one['cpu_s'] / many['cpu_s']:.2f}x; saved per track: wall "
          f"{(one['wall_s'] - many['wall_s']) / n:.2f} s, CPU "
          f"{(one['cpu_s'] - many['cpu_s']) / n:.2f} s  (load at end {load_end})")
    if args.json:
        args.json.write_text(json.dumps({"tracks": n, "seconds": args.seconds,
                                         "per_run": per_run, "one_run_per_track": one,
                                         "runs_of_many": many}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
