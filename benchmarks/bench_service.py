#!/usr/bin/env python
"""The separation service alone: N generated songs sent to it at once, timed.

    python benchmarks/bench_service.py --song-dir DIR [--count 8] [--seconds 240]
                                       [--device cuda] [--full-size] [--json out.json]

One of the host's two limits for issue 22's GPU acceptance (the other: the encode floor,
``bench_ceiling.py``): the service (``imaker separator serve --preload``, started fresh,
model loaded and warmed up before the clock starts) separates the songs' mixtures (as the
stored ``source.flac`` a run hands it) into FLAC stems, all requests sent at once as the
runs would; prints the wall time, audio-seconds per second and what ``/health`` says
about its admission (separations at once; on CUDA the memory budget and the measured
footprint: ``imaker.separator.admission``). The songs come from ``render_songs.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--song-dir", type=Path, required=True,
                   help="generated songs (render_songs.py renders the missing ones)")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--full-size", action="store_true",
                   help="real HTDemucs architecture, random weights (else the tiny model)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()

    from bench_batch import _free_port
    from render_songs import songs as rendered

    from imaker import devsong
    from imaker.devmodel import HTDEMUCS_SIZE, build_model_repo
    from imaker.separator.client import SeparatorClient
    from imaker.settings import load_settings

    work = Path(tempfile.mkdtemp(prefix="imaker-service-"))
    songs = rendered(args.song_dir, args.count, args.seconds, args.seed)
    sources = [work / "library" / s.name / "source.flac" for s in songs]
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(devsong.encode_mixture, songs, sources))
    size = HTDEMUCS_SIZE if args.full_size else {}
    name = "random_htdemucs" if args.full_size else "tiny_htdemucs"
    repo = build_model_repo(work / "models", name, **size)
    port = _free_port()
    os.environ.update(DEMUCS_MODEL=name, DEMUCS_MODEL_REPO=str(repo), DEMUCS_DEVICE=args.device,
                      SEPARATOR_PORT=str(port), HF_HUB_OFFLINE="1", IMAKER_ENV_FILE="")
    os.environ.pop("SEPARATOR_URL", None)
    os.environ.pop("SEPARATOR_CONCURRENCY", None)  # the service's own admission
    client = SeparatorClient.from_settings(load_settings())
    t0 = time.perf_counter()
    client.ensure_running(preload=True)  # returns once the model is loaded and warmed up
    ready = time.perf_counter() - t0
    before = client.health() or {}
    pid = before.get("pid")
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(len(sources)) as pool:
            metas = list(pool.map(lambda s: client.separate(s.parent.name, s,
                                                            work / "stems" / s.parent.name),
                                  sources))
        wall = time.perf_counter() - start
        after = client.health() or {}
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
    audio = args.count * args.seconds
    model_s = sum(m.get("separation_seconds", 0.0) for m in metas)
    report = {"device": args.device, "model": name, "songs": args.count, "seconds": args.seconds,
              "service_start_s": ready, "wall": wall, "audio_s_per_s": audio / wall,
              "separation_seconds_summed": model_s, "concurrency": after.get("concurrency"),
              "gpu_admission": after.get("gpu_admission"),
              "shared_passes": after.get("shared_passes"), "cores": after.get("cores")}
    print(f"\n== the separation service alone: {args.count} x {args.seconds:g} s generated songs, "
          f"{name} on {args.device}, all requests at once (service started and warmed up in "
          f"{ready:.1f} s, not timed)")
    print(f"wall {wall:.1f} s = {audio / wall:.1f} audio-s/s; separations at once "
          f"{report['concurrency']}; shared forward passes {report['shared_passes']}; "
          f"model time summed over the songs {model_s:.1f} s")
    if report["gpu_admission"]:
        g = report["gpu_admission"]
        print(f"CUDA admission: budget {g['budget_bytes'] / 2**30:.1f} GiB, "
              f"{g['per_separation_bytes'] / 2**20:.0f} MiB per separation "
              f"({g['windows_per_call']} windows x ({g['pass_bytes_per_window'] / 2**20:.0f} "
              f"MiB in a pass + {g['input_bytes_per_window'] / 2**20:.1f} MiB waiting)) -> "
              f"{g['admitted']} at once, passes of up to {g['windows_per_pass']} windows")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
