#!/usr/bin/env python
"""Peak memory and CPU cost of one separation per model, as the separation service runs it:
the README's "Choosing a model" table (issue 21, point 7).

    .venv/bin/python benchmarks/bench_memory.py [--seconds 20] [--threads 1]
        [--models htdemucs,kim,ep317] [--bf16]

Each model at its published size with random weights (no weights can be downloaded here:
the cost depends on the architecture, not on the values) — HTDemucs
(``imaker.devmodel.HTDEMUCS_SIZE``: the released htdemucs), Kim's Mel-Band RoFormer and
viperx's BS-RoFormer ep_317 (the configs of ``bench_roformer.py``) — is loaded in a **fresh
process** that then separates ``--seconds`` of test music streamed to a sink (as the
service does: the stems never exist whole), and reports:

* ``rss_loaded_mib``: resident memory after loading (the interpreter, torch, the weights);
  ``peak_rss_loading_mib``: the peak while loading (the models are written beforehand by
  the parent process, so none of this is the writer's);
* ``peak_rss_mib``: peak resident memory over the separation (``ru_maxrss``): what a host
  must hold free per model kept hot in the service, plus one separation's working set;
* ``cpu_s_per_audio_s``: the process's CPU time (user + system) per second of audio.

The working set does not grow with the track's length (windows are overlap-added into a
bounded buffer and streamed out), so 20 s show the steady state; ``--seconds 600`` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ("htdemucs", "kim", "ep317")


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def write_model(key: str, folder: Path) -> None:
    """The random model of ``key`` in ``folder`` (written by the parent: the child's memory
    is the loader's and the separation's only)."""
    folder.mkdir(parents=True)
    if key == "htdemucs":
        from imaker.devmodel import HTDEMUCS_SIZE, build_model_repo

        build_model_repo(folder, "random_htdemucs", **HTDEMUCS_SIZE)
    else:
        from bench_roformer import write_random_model

        write_random_model(folder, key)


def child(key: str, folder: Path, seconds: float, threads: int, bf16: bool) -> dict:
    """Load one model from ``folder`` and separate ``seconds`` of music; runs in its own
    process."""
    import torch

    torch.set_num_threads(threads)
    from test_roformer import music  # the music-like test signal of the equivalence tests

    wav = music(seconds, seed=7)
    frames = 0

    def sink(start, chunk):
        nonlocal frames
        frames += chunk.shape[-1]

    before = rss_mib()
    if key == "htdemucs":
        from imaker import separation

        loaded = separation.load_model("random_htdemucs", folder, "cpu")
        params = sum(p.numel() for p in loaded.model.parameters())
        run = lambda: separation.separate(  # noqa: E731
            loaded, wav, sink=sink, cpu_autocast=bf16 or False, threads=lambda: threads)
    else:
        from imaker import roformer

        [ckpt] = folder.glob("*.ckpt")
        model = roformer.load(ckpt, ckpt.with_suffix(".yaml"))
        params = model.parameters
        run = lambda: model.separate(  # noqa: E731
            wav, sink=sink, autocast="bf16" if bf16 else None, threads=lambda: threads)
    loaded_rss = rss_mib()
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    c0, t0 = cpu_s(), time.perf_counter()
    run()
    cpu, wall = cpu_s() - c0, time.perf_counter() - t0
    assert frames == wav.shape[-1], (frames, wav.shape)
    return {"model": key, "precision": "bf16" if bf16 else "fp32", "seconds": seconds,
            "threads": threads, "parameters_m": round(params / 1e6, 1),
            "rss_before_load_mib": round(before), "rss_loaded_mib": round(loaded_rss),
            "peak_rss_loading_mib": round(load_peak),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cpu_s_per_audio_s": round(cpu / seconds, 2),
            "wall_s_per_audio_s": round(wall / seconds, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bf16", action="store_true", help="also each model under bf16 autocast")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        key, precision, folder = args.child.split(":", 2)
        print(json.dumps(child(key, Path(folder), args.seconds, args.threads,
                               precision == "bf16")))
        return 0
    from bench_roformer import cpu_flags, cpu_name

    print(f"CPU {cpu_name()} ({cpu_flags()}); {os.cpu_count()} cores; threads {args.threads}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for key in args.models.split(","):
            if key not in MODELS:
                raise SystemExit(f"unknown model {key!r}; one of {', '.join(MODELS)}")
            folder = Path(tmp) / key
            write_model(key, folder)
            for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", f"{key}:{precision}:{folder}",
                     "--seconds", str(args.seconds), "--threads", str(args.threads)],
                    capture_output=True, text=True, cwd=ROOT,
                    env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode != 0:
                    raise SystemExit(f"{key} {precision} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{key:8s} {precision}: {row['parameters_m']} M parameters, RSS loaded "
                      f"{row['rss_loaded_mib']} MiB (peak while loading "
                      f"{row['peak_rss_loading_mib']}), peak {row['peak_rss_mib']} MiB, "
                      f"{row['cpu_s_per_audio_s']} CPU-s per audio-s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
