#!/usr/bin/env python
"""Generated songs for the benchmarks, rendered once and reused.

    python benchmarks/render_songs.py OUT_DIR [--count 8] [--seconds 240] [--seed 0]
                                              [--processes N]

``OUT_DIR/devsong_<seed>/`` for seeds ``seed .. seed + count - 1`` (``imaker dev-song``'s
MUSDB18-HQ layout): a folder whose ``song.json`` already says the same seed, length and
generator version is kept, the others are rendered, ``processes`` songs at a time (each
rendering its 4 stems in threads). ``bench_batch.py`` and ``bench_ceiling.py`` take
``--song-dir`` to use the same songs, so ``benchmarks/gpu.sh`` renders them once.

On an offline GPU machine without FluidSynth (``benchmarks/gpu_env.sh`` unpacks the library
that ``benchmarks/gpu_wheels.sh`` packed): ``IMAKER_FLUIDSYNTH_LIB`` names the library file
(pyfluidsynth finds it through ``ctypes.util.find_library``, which only looks at the
system's ld.so cache and compilers); its dependencies come from ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def use_bundled_fluidsynth() -> None:
    """Let pyfluidsynth load ``IMAKER_FLUIDSYNTH_LIB`` where the system has no FluidSynth
    (called in every process that renders, before ``fluidsynth`` is imported)."""
    lib = os.environ.get("IMAKER_FLUIDSYNTH_LIB")
    if not lib:
        return
    import ctypes.util

    found = ctypes.util.find_library

    def find_library(name: str):
        return found(name) or (lib if "fluidsynth" in name else None)

    ctypes.util.find_library = find_library


def _render(folder: str, seed: int, seconds: float) -> None:
    use_bundled_fluidsynth()
    from imaker import devsong

    devsong.write_song(Path(folder), seed, seconds, workers=len(devsong.SOURCES))


def current(folder: Path, seed: int, seconds: float) -> bool:
    """Whether ``folder`` holds that song, whole (song.json is written last)."""
    from imaker import devsong

    try:
        info = json.loads((folder / "song.json").read_text())
    except (OSError, ValueError):
        return False
    return (info.get("seed") == seed and float(info.get("seconds", -1)) == float(seconds)
            and info.get("generator_version") == devsong.GENERATOR_VERSION
            and all((folder / f).is_file() for f in info.get("files", [])))


def songs(out_dir: Path, count: int, seconds: float, seed: int = 0,
          processes: int | None = None) -> list[Path]:
    """The song folders, rendering those missing (see the module docstring)."""
    from imaker import devsong

    out_dir = Path(out_dir)
    folders = [out_dir / devsong.song_name(s) for s in range(seed, seed + count)]
    todo = [(str(f), s) for f, s in zip(folders, range(seed, seed + count))
            if not current(f, s, seconds)]
    if not todo:
        return folders
    t0 = time.perf_counter()
    processes = max(1, min(processes or len(os.sched_getaffinity(0)), len(todo)))
    if processes == 1:
        for f, s in todo:
            _render(f, s, seconds)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawned, not forked (the caller may hold threads); each child loads FluidSynth
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            for fut in [pool.submit(_render, f, s, seconds) for f, s in todo]:
                fut.result()
    print(f"rendered {len(todo)} x {seconds:g} s songs into {out_dir} in "
          f"{time.perf_counter() - t0:.1f} s ({processes} at a time; not timed)", flush=True)
    return folders


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=None, help="default: the cores")
    args = p.parse_args()
    use_bundled_fluidsynth()
    for folder in songs(args.out_dir, args.count, args.seconds, args.seed, args.processes):
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
