#!/usr/bin/env python
"""Our `stems` step vs the demucs CLI on the same input, model repo, device and segment.

    python benchmarks/bench_separation.py [--seconds 30] [--model NAME --repo DIR] [--device cpu]
        [--batch-size N]
    python benchmarks/bench_separation.py --compare-batch 0,2,4,8 [--seconds 60] [--full-size]

Without --repo it builds the tiny random test model (same code path as real weights).
Prints wall times and the ratios:
  * our pipeline in a fresh process (imports + model load + all four stages) vs
    `python -m demucs` in a fresh process (imports + model load + separation + writing wavs);
  * our separation alone (model warm) vs the same;
  * every non-separation step (decode/validate, mix/encode/tag, probe/hash/manifest) vs
    the separation.

--batch-size N: our separation with N segments per forward pass (imaker.fast_apply); 0 is
demucs' apply_model; default: auto (DEMUCS_BATCH_SIZE semantics).
--compare-batch LIST: inference only (``imaker.separation.separate`` on generated audio, no
I/O), one fresh process per batch size (0 = demucs apply_model) and round, after a warm-up
pass; prints wall time and peak RSS of each.
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
    """One fresh process through the real pipeline stages (the separation in-process, as the
    separation service runs it); prints JSON timings."""
    t0 = time.perf_counter()
    import threading

    from imaker.pipeline import (Library, make_variants, prepare_source, separate_to_folder,
                                 write_manifest)
    from imaker.queues import QueueStore
    from imaker.separator.service import SeparateRequest, Service, _Separator
    from imaker.settings import load_settings

    t_import = time.perf_counter() - t0
    settings = load_settings()
    store, lib = QueueStore.from_settings(settings), Library.from_settings(settings)
    # what the separation service runs for the request (one path): this model, repo, device
    options = settings.separation.model_copy(update={
        "model": args.model, "model_repo": Path(args.repo), "device": args.device,
        "segment": args.segment, "batch_size": args.batch_size})
    req = SeparateRequest(job_id="bench", source=str(lib.track_dir("bench") / "source.flac"),
                          stems_dir=str(lib.stem_dir("bench")), separation=options)
    sep = _Separator(Service(concurrency=1), req, threading.Event())
    times = {"imports": t_import}
    t = time.perf_counter()
    for name in sep.plan.models:
        sep.load(name)
    times["model_load"] = time.perf_counter() - t
    t = time.perf_counter()
    drop = store.claim(store.discover()[0], by="bench").drop_id
    prepare_source(store, lib, "bench", drop)
    times["source_audio"] = time.perf_counter() - t
    t = time.perf_counter()
    meta = separate_to_folder(lib.track_dir("bench") / "source.flac", lib.stem_dir("bench"),
                              "bench", sep)
    times["stems_total"] = time.perf_counter() - t
    times["separation"] = meta["separation_seconds"]
    t = time.perf_counter()
    make_variants(settings.output, lib, "bench")
    times["variants"] = time.perf_counter() - t
    t = time.perf_counter()
    write_manifest(store, lib, "bench", drop)
    times["manifest"] = time.perf_counter() - t
    times["process_total"] = time.perf_counter() - t0
    print(json.dumps(times))


def _rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as fh:
        current = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, peak


def run_infer_child(args) -> None:
    """One fresh process: load, warm up, separate `seconds` of noise+tone; prints JSON."""
    import numpy as np

    from imaker import separation

    loaded = separation.load_model(args.model, Path(args.repo), args.device)
    rng = np.random.default_rng(0)

    def signal(seconds: float) -> np.ndarray:
        n = int(seconds * loaded.samplerate)
        t = np.arange(n) / loaded.samplerate
        mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(n)
        return np.stack([mono, 0.7 * mono]).astype(np.float32)

    separation.separate(loaded, signal(8.0), batch_size=args.batch_size)  # warm-up
    wav = signal(args.seconds)
    rss_before, _ = _rss_mb()
    t = time.perf_counter()
    separation.separate(loaded, wav, batch_size=args.batch_size, segment=args.segment)
    wall = time.perf_counter() - t
    _, peak = _rss_mb()
    print(json.dumps({"batch_size": args.batch_size, "wall_s": wall, "rss_before_mb": rss_before,
                      "peak_rss_mb": peak}))


def compare_batch(args) -> None:
    import torch

    sizes = [int(x) for x in args.compare_batch.split(",")]
    results: dict[int, list[dict]] = {b: [] for b in sizes}
    for _ in range(args.rounds):
        for b in sizes:
            cmd = [sys.executable, __file__, "--infer-child", "--model", args.model, "--repo",
                   args.repo, "--device", args.device, "--seconds", str(args.seconds),
                   "--batch-size", str(b)] + (["--segment", str(args.segment)]
                                               if args.segment else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1"))
            results[b].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"inference only: {args.seconds:.0f} s stereo, model {args.model}, device "
          f"{args.device}, cores {os.cpu_count()}, torch {torch.__version__}, "
          f"{args.rounds} round(s), fresh process each")
    base = min(r["wall_s"] for r in results[sizes[0]])
    for b in sizes:
        walls = [r["wall_s"] for r in results[b]]
        name = "apply_model (demucs)" if b == 0 else f"batched B={b}"
        print(f"  {name:22s} wall min {min(walls):7.2f} s  (all: "
              f"{', '.join(f'{w:.2f}' for w in walls)})  x{base / min(walls):.2f} vs first  "
              f"peak RSS {max(r['peak_rss_mb'] for r in results[b]):7.0f} MiB "
              f"(before separation {min(r['rss_before_mb'] for r in results[b]):.0f})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--model", default=None)
    p.add_argument("--repo", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--segment", type=float, default=None)
    p.add_argument("--full-size", action="store_true",
                   help="random weights but the released htdemucs architecture "
                        "(devmodel.HTDEMUCS_SIZE): realistic compute without downloading weights")
    p.add_argument("--batch-size", type=int, default=None,
                   help="segments per forward pass (0: demucs apply_model; default auto)")
    p.add_argument("--compare-batch", default=None, metavar="LIST",
                   help="inference-only comparison of batch sizes, e.g. 0,2,4,8")
    p.add_argument("--rounds", type=int, default=1, help="rounds for --compare-batch")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--ours-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--infer-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ours_child:
        run_ours_child(args)
        return 0
    if args.infer_child:
        run_infer_child(args)
        return 0

    work = Path(tempfile.mkdtemp(prefix="imaker-bench-"))
    if args.repo is None:
        from imaker.devmodel import HTDEMUCS_SIZE, build_model_repo

        size = HTDEMUCS_SIZE if args.full_size else {}
        name = "random_htdemucs" if args.full_size else "tiny_htdemucs"
        args.repo = str(build_model_repo(work / "models", name, **size))
        args.model = args.model or name
    args.model = args.model or "htdemucs"
    if args.compare_batch:
        compare_batch(args)
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        return 0
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
             "--device", args.device] + (["--segment", str(args.segment)] if args.segment else []) \
        + (["--batch-size", str(args.batch_size)] if args.batch_size is not None else [])
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
