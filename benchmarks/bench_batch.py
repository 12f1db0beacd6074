#!/usr/bin/env python
"""Batch ingestion vs the demucs CLI on the same generated files.

    python benchmarks/bench_batch.py [--tracks 8] [--seconds 60] [--full-size] [--long-seconds 0]

Reference: ``python -m demucs`` over all files in one process (loads the model once, walks the
files, writes 4 wav stems each). Ours: the same files as bundles in a queue, processed by
``imaker ingest --once`` in one process (model loaded once; per track: decode, separate,
FLAC stems store, variants encoded + tagged, manifest, checks, catalog). Same model repo,
device and segment. Prints wall times, the ratio, per-stage sums and peak RSS of each
process (``wait4``'s ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_separation import make_input  # noqa: E402


def run_measured(cmd: list[str], log: Path, **kwargs) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of one child process; output goes to ``log``."""
    start = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, **kwargs)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024 / 1024, proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--long-seconds", type=float, default=0.0, help="add one long track (e.g. 1200)")
    p.add_argument("--full-size", action="store_true", help="real HTDemucs architecture, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    from imaker.devmodel import build_model_repo

    work = Path(tempfile.mkdtemp(prefix="imaker-batch-"))
    size = {"channels": 48, "t_layers": 5} if args.full_size else {}
    name = "random_htdemucs" if args.full_size else "tiny_htdemucs"
    repo = build_model_repo(work / "models", name, **size)
    (work / "in").mkdir()
    inputs = [make_input(work / "in" / f"track{i:02d}.m4a", args.seconds) for i in range(args.tracks)]
    if args.long_seconds:
        inputs.append(make_input(work / "in" / "long.m4a", args.long_seconds))

    demucs_cmd = [sys.executable, "-m", "demucs", "-n", name, "--repo", str(repo), "-d", args.device,
                  "-o", str(work / "demucs_out"), *map(str, inputs)]
    d_wall, d_rss, rc = run_measured(demucs_cmd, work / "demucs.log")
    if rc != 0:
        print((work / "demucs.log").read_text()[-2000:])
        return 1

    data, home = work / "data", work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    queue = data / "queues" / "other"
    for src in inputs:
        bundle = queue / f"job_{src.stem}"
        bundle.mkdir(parents=True)
        shutil.copy(src, bundle / "audio.m4a")
        (bundle / "job.json").write_text(json.dumps({
            "schema_version": 1, "job_id": src.stem, "source_type": "local", "title": src.stem,
            "artist": "Bench", "audio": "audio.m4a"}))
    env = dict(os.environ, IMAKER_DATA=str(data), DAGSTER_HOME=str(home), DEMUCS_MODEL=name,
               DEMUCS_MODEL_REPO=str(repo), DEMUCS_DEVICE=args.device, HF_HUB_OFFLINE="1")
    o_wall, o_rss, rc = run_measured([str(Path(sys.executable).with_name("imaker")), "ingest",
                                      "--once"], work / "imaker.log", env=env, cwd=ROOT)
    if rc != 0:
        print((work / "imaker.log").read_text()[-2000:])
        return 1
    sep = sum(json.loads((data / "stems" / s.stem / "stems.json").read_text())["separation_seconds"]
              for s in inputs)
    audio_s = args.tracks * args.seconds + args.long_seconds
    print(f"inputs: {args.tracks} x {args.seconds:.0f} s" + (f" + 1 x {args.long_seconds:.0f} s" if
          args.long_seconds else "") + f"; model {name}; device {args.device}; cores {os.cpu_count()}")
    print(f"demucs CLI (one process, 4 wav stems per file):        {d_wall:8.1f} s  peak RSS {d_rss:5.2f} GiB")
    print(f"imaker ingest --once (one process, full pipeline):     {o_wall:8.1f} s  peak RSS {o_rss:5.2f} GiB")
    print(f"  of which separation {sep:.1f} s; everything else {o_wall - sep:.1f} s "
          f"({(o_wall - sep) / len(inputs):.1f} s per track)")
    print(f"ratio ours/demucs CLI: {o_wall / d_wall:.2f}   realtime factor ours: {audio_s / o_wall:.2f}x")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
