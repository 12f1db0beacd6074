#!/usr/bin/env python
"""Memory of a long track, stage by stage: does any stage hold the whole track?

    .venv/bin/python benchmarks/bench_long_track.py [--minutes 60] [--stages source,stems,variants]

One input of ``--minutes`` (the tests' ``make_audio``: a tone + pink noise, stereo AAC 192k,
in a job bundle as a retriever leaves it) through the real stages, each in a **fresh process** as a run (or
the separation service) runs it:

* ``source``: ``pipeline.prepare_source`` (decode, checks, ``source.flac``);
* ``stems``: ``pipeline.separate_to_folder`` through the separation service's own
  ``_Separator`` (the tiny random HTDemucs of ``imaker dev-model``: the model's working set
  is bounded by its windows whatever its size, ``bench_memory.py`` measures that part);
* ``variants``: ``pipeline.make_variants`` (mix + encode the default variants).

For each: the peak of the process's **anonymous** memory over the stage (``RssAnon`` sampled
every 2 ms by a thread; private memory a host must have free — what an out-of-memory kill
counts) above the process's level before the stage, and the peak resident set
(``VmHWM``, which also counts file pages mapped from disk: the page cache gives those back
under pressure), wall and CPU seconds. A stage that held the decoded track whole would show
about 20 MiB of float32 per stereo minute (1.2 GiB per hour) or more in ``peak anon``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

STAGES = ("source", "stems", "variants")
JOB = "long"


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in KiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakAnon:
    """The peak of ``RssAnon`` while the block runs (a sampling thread)."""

    def __enter__(self):
        self.base = self.peak = _status("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _status("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon"))


def child(stage: str) -> dict:
    """One stage in this (fresh) process; the settings come from the environment."""
    import resource

    from imaker import pipeline
    from imaker.queues import QueueStore
    from imaker.settings import load_settings

    settings = load_settings()
    store = QueueStore.from_settings(settings)
    lib = pipeline.Library.from_settings(settings)
    if stage == "source":
        drop = store.claim(store.discover()[0], by="bench").drop_id
        run = lambda: pipeline.prepare_source(store, lib, JOB, drop)  # noqa: E731
    elif stage == "stems":
        from imaker.separator.service import SeparateRequest, Service, _Separator

        req = SeparateRequest(job_id=JOB, source=str(lib.track_dir(JOB) / "source.flac"),
                              stems_dir=str(lib.stem_dir(JOB)), separation=settings.separation)
        sep = _Separator(Service(concurrency=1), req, threading.Event())
        for name in sep.plan.models:  # loaded before the measured part, as a warm service
            sep.load(name)
        run = lambda: pipeline.separate_to_folder(  # noqa: E731
            Path(req.source), Path(req.stems_dir), JOB, sep)
    else:  # variants
        run = lambda: pipeline.make_variants(settings.output, lib, JOB)  # noqa: E731
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with PeakAnon() as mem:
        run()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"stage": stage, "wall_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
            "anon_before_mib": round(mem.base / 1024, 1),
            "peak_anon_over_mib": round((mem.peak - mem.base) / 1024, 1),
            "peak_rss_mib": round(_status("VmHWM") / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return 0
    from conftest import make_audio, write_bundle

    with tempfile.TemporaryDirectory(prefix="imaker-long-") as tmp:
        data = Path(tmp) / "data"
        env = {**os.environ, "IMAKER_DATA": str(data), "DEMUCS_MODEL": "tiny_htdemucs",
               "DEMUCS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "imaker.cli", "dev-model", str(data / "models")],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        t = time.perf_counter()
        src = make_audio(Path(tmp) / "input.m4a", args.minutes * 60,
                         fmt_args=("-c:a", "aac", "-b:a", "192k"))
        print(f"input: {args.minutes:g} min, {src.stat().st_size / 2**20:.1f} MiB AAC "
              f"(made in {time.perf_counter() - t:.0f} s); decoded float32 stereo: "
              f"{args.minutes * 60 * 44100 * 8 / 2**20:.0f} MiB", flush=True)
        write_bundle(data / "queues" / "youtube_audio", JOB, src, title="Long", artist="Bench")
        src.unlink()
        rows = []
        for stage in args.stages.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", stage], env=env,
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                print(f"{stage}: failed (exit {proc.returncode})")
                return 1
            rows.append(json.loads(line[7:]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| stage | peak anonymous memory over the stage's start | peak RSS (incl. mapped "
          f"files) | wall | CPU |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['peak_anon_over_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB "
              f"| {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
