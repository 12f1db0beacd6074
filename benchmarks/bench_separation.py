#!/usr/bin/env python
"""Our `stems` step vs the demucs CLI on the same input, model repo, device and segment.

    python benchmarks/bench_separation.py [--seconds 30] [--model NAME --repo DIR] [--device cpu]

Without --repo it builds the tiny random test model (same code path as real weights).
Prints wall times and the ratios:
  * our pipeline in a fresh process (imports + model load + all four stages) vs
    `python -m demucs` in a fresh process (imports + model load + separation + writing wavs);
  * our separation alone (model warm) vs the same;
  * every non-separation step (decode/validate, mix/encode/tag, probe/hash/manifest) vs
    the separation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_input(path: Path, seconds: float) -> Path:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"sine=frequency=220:sample_rate=44100:duration={seconds}",
         "-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude=0.2:sample_rate=44100:duration={seconds}",
         "-filter_complex", "[0][1]amix=inputs=2:normalize=0,pan=stereo|c0=c0|c1=0.7*c0",
         "-c:a", "aac", "-b:a", "192k", str(path)], check=True)
    return path


def run_ours_child(args) -> None:
    """One fresh process through the real pipeline stages; prints JSON timings."""
    t0 = time.perf_counter()
    from imaker.pipeline import (Library, make_variants, prepare_source, separate_stems,
                                 write_manifest)
    from imaker.queues import Owner, QueueStore
    from imaker.settings import load_settings
    from resources import SeparatorResource, build_resources

    t_import = time.perf_counter() - t0
    settings = load_settings()
    store, lib = QueueStore.from_settings(settings), Library.from_settings(settings)
    sep = SeparatorResource(model=args.model, model_repo=args.repo, device=args.device,
                            segment=args.segment)
    times = {"imports": t_import}
    t = time.perf_counter()
    sep.load()
    times["model_load"] = time.perf_counter() - t
    t = time.perf_counter()
    prepare_source(store, lib, "bench", Owner.current("bench"))
    times["source_audio"] = time.perf_counter() - t
    t = time.perf_counter()
    meta = separate_stems(lib, "bench", sep)
    times["stems_total"] = time.perf_counter() - t
    times["separation"] = meta["separation_seconds"]
    t = time.perf_counter()
    make_variants(build_resources(settings)["library"].output_options(), lib, "bench")
    times["variants"] = time.perf_counter() - t
    t = time.perf_counter()
    write_manifest(store, lib, "bench")
    times["manifest"] = time.perf_counter() - t
    times["process_total"] = time.perf_counter() - t0
    print(json.dumps(times))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--model", default=None)
    p.add_argument("--repo", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--segment", type=float, default=None)
    p.add_argument("--full-size", action="store_true",
                   help="random weights but the real htdemucs architecture (channels=48, "
                        "t_layers=5): realistic compute without downloading weights")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--ours-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ours_child:
        run_ours_child(args)
        return 0

    work = Path(tempfile.mkdtemp(prefix="imaker-bench-"))
    if args.repo is None:
        from imaker.devmodel import build_model_repo

        size = {"channels": 48, "t_layers": 5} if args.full_size else {}
        name = "random_htdemucs" if args.full_size else "tiny_htdemucs"
        args.repo = str(build_model_repo(work / "models", name, **size))
        args.model = args.model or name
    args.model = args.model or "htdemucs"
    src = make_input(work / "input.m4a", args.seconds)

    # reference: the demucs CLI, fresh process, same model repo / device / segment
    cli = [sys.executable, "-m", "demucs", "-n", args.model, "--repo", args.repo,
           "-d", args.device, "-o", str(work / "demucs_out")]
    if args.segment:
        cli += ["--segment", str(args.segment)]
    t = time.perf_counter()
    subprocess.run([*cli, str(src)], check=True, capture_output=True)
    demucs_wall = time.perf_counter() - t

    # ours: a fresh process through the four stages
    data = work / "data"
    bundle = data / "queues" / "other" / "job_bench"
    bundle.mkdir(parents=True)
    (bundle / "audio.m4a").write_bytes(src.read_bytes())
    (bundle / "job.json").write_text(json.dumps({
        "schema_version": 1, "job_id": "bench", "source_type": "local", "title": "Bench",
        "artist": "Bench", "audio": "audio.m4a"}))
    env = dict(os.environ, IMAKER_DATA=str(data), HF_HUB_OFFLINE="1")
    child = [sys.executable, __file__, "--ours-child", "--model", args.model, "--repo", args.repo,
             "--device", args.device] + (["--segment", str(args.segment)] if args.segment else [])
    t = time.perf_counter()
    out = subprocess.run(child, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    ours_wall = time.perf_counter() - t
    times = json.loads(out.stdout.strip().splitlines()[-1])

    non_sep = times["source_audio"] + (times["stems_total"] - times["separation"]) \
        + times["variants"] + times["manifest"]
    print(f"input: {args.seconds:.0f} s stereo AAC; model {args.model} from {args.repo}; "
          f"device {args.device}; cores {os.cpu_count()}")
    print(f"demucs CLI (fresh process, separate + write wavs): {demucs_wall:8.2f} s")
    print(f"ours (fresh process, all 4 stages):                {ours_wall:8.2f} s")
    print(f"  imports {times['imports']:.2f} s, model load {times['model_load']:.2f} s")
    print(f"  source_audio {times['source_audio']:.2f} s, separation {times['separation']:.2f} s, "
          f"stem storage {times['stems_total'] - times['separation']:.2f} s, "
          f"variants {times['variants']:.2f} s, manifest {times['manifest']:.2f} s")
    print(f"ratio ours/demucs CLI, whole process:        {ours_wall / demucs_wall:6.2f}")
    print(f"ratio our separation step (model loaded)/demucs CLI: "
          f"{times['separation'] / demucs_wall:6.2f}")
    print(f"ratio non-separation steps/our separation:   {non_sep / times['separation']:6.2f} "
          f"({non_sep:.2f} s)")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
