#!/usr/bin/env python
"""The pipeline's ceiling (issue 22): what everything except the separation network costs.

    python benchmarks/bench_ceiling.py [--songs 8] [--seconds 240] [--input-format m4a]
                                       [--max-runs N] [--json out.json] [--keep]

``--songs`` generated songs (``imaker dev-song``, seeds 0..N-1; rendered before, not timed)
go through the **sensor path** — ``dagster dev`` running (started and idle beforehand), the
bundles renamed into the queue at once, timed until the last run has succeeded and the
catalog has been refreshed after it — with the **oracle model** (``imaker/oracle.py``: the
separation service loads it by name from ``DEMUCS_MODEL_REPO`` and streams each song's known
stems through the same sink and stems store as a real model), outputs AAC 256k (the default
variants: instrumental + no drums), and NAS sync on, to a local folder.

How each figure is measured:

* **CPU of the process trees**: a sampler thread reads ``/proc/<pid>/stat`` of every process
  descended from ``dagster dev`` (webserver, daemon, code server, one process per run and
  their ffmpeg children) and, separately, from the separation service (started by this
  script, not auto-started by a run) every ``--sample-interval`` s. A tree's CPU at time t
  is the sum over its live processes of user + system time, plus the children each has
  reaped (``cutime``/``cstime``), so nothing that exits inside the tree is lost. Whole-tree
  figures are the difference between the drop and the end.
* **Per step**: Dagster's event log gives each step's start and end (and, inside it, when
  the step's own function starts and stops: after ``STEP_START``/input loading, before its
  first output, materialization or check evaluation); the event log also names each run's
  process (``Started process for run (pid: N)``). A step's CPU is that process subtree's
  CPU between the step's start and end (interpolated between samples).
* **Per ffmpeg/ffprobe invocation** (exact): the pipeline's PATH starts with a small C
  wrapper (``benchmarks/toolwrap.c``, built here with ``cc``) that runs the real tool and
  logs its start, end, parent pid and ``wait4`` rusage; each invocation is assigned to the
  step of its parent process that contains it and classified by its arguments (decode,
  encode AAC/FLAC, loudness, waveform, probe). Without ``cc`` that breakdown is left out.
* **Framework overhead** per run: the run process's CPU from its start to its first step
  (imports, instance, run setup), between and after its steps, and inside each step
  outside the step's function; the resident processes (daemon, webserver, code server:
  the tree minus the run processes) are reported whole and per track, next to their idle
  rate measured over ``--idle-seconds`` before the drop.
* **Tags**: not separable inside the variants step, so measured apart: the same
  ``imaker.audio.Tags`` written (mutagen, in this process) onto copies of the produced
  files, ``time.process_time()``.
* **Encode floor**: ffmpeg encoding the same variants (the known stems mixed with the
  pipeline's own ``imaker.variants.mix``, written as float WAV, not timed) with the same
  codec arguments and bitrate, one ffmpeg per file, as many at once as there are cores (one
  core per stream: the native AAC encoder has no threads); CPU from ``wait4`` per process.

Figures are CPU-seconds (user + system) unless they say wall; "per audio minute" divides by
the generated audio's total length.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_batch import (_cpu_model, _free_port, _instance_yaml, _script, _service_pid,  # noqa: E402
                         run_limit_env, runs_at_once)

TICK = os.sysconf("SC_CLK_TCK")
ORACLE = "oracle"


# ----- process-tree CPU sampling -------------------------------------------------------
def _boot_time() -> float:
    with open("/proc/stat") as fh:
        return float(next(l.split()[1] for l in fh if l.startswith("btime")))


def _stat(pid: int):
    """(ppid, own CPU s, reaped children's CPU s, start epoch) or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    f = raw[raw.rfind(b")") + 2:].split()
    # f[0] = state (field 3); utime = field 14 -> f[11]
    return (int(f[1]), (int(f[11]) + int(f[12])) / TICK, (int(f[13]) + int(f[14])) / TICK,
            int(f[19]) / TICK)


class TreeSampler(threading.Thread):
    """Samples the CPU of every process descended from ``roots`` (see the module doc)."""

    def __init__(self, roots: dict[str, int], interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.roots = dict(roots)
        self.parent: dict[int, int] = {pid: 0 for pid in roots.values()}
        self.started: dict[int, float] = {}
        self.ignored: set[int] = set()
        self.samples: list[tuple[float, dict[int, float]]] = []  # (t, {pid: own + children})
        self.own: list[tuple[float, dict[int, float]]] = []
        self._halt = threading.Event()
        self._boot = _boot_time()
        self.sample()

    def sample(self) -> None:
        t = time.time()
        listing = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        pending: dict[int, tuple] = {}
        snap: dict[int, float] = {}
        own: dict[int, float] = {}
        for pid in listing:
            if pid in self.ignored:
                continue
            st = _stat(pid)
            if st is None:
                continue
            if pid in self.parent:
                snap[pid], own[pid] = st[1] + st[2], st[1]
            else:
                pending[pid] = st
        changed = True
        while changed and pending:  # a new process belongs to the tree if its parent does
            changed = False
            for pid, st in list(pending.items()):
                if st[0] in self.parent:
                    self.parent[pid] = st[0]
                    self.started[pid] = self._boot + st[3]
                    snap[pid], own[pid] = st[1] + st[2], st[1]
                    del pending[pid]
                    changed = True
        for pid, st in pending.items():  # parent outside the tree (or gone before us)
            if st[0] not in pending:
                self.ignored.add(pid)
        self.samples.append((t, snap))
        self.own.append((t, own))

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()

    def subtree(self, root: int) -> set[int]:
        kids: dict[int, list[int]] = defaultdict(list)
        for pid, ppid in self.parent.items():
            kids[ppid].append(pid)
        out, todo = set(), [root]
        while todo:
            pid = todo.pop()
            if pid not in out:
                out.add(pid)
                todo.extend(kids.get(pid, ()))
        return out

    def series(self, root: int) -> list[tuple[float, float]]:
        """(t, CPU of ``root``'s subtree), made non-decreasing (a process that exits is
        counted by its parent only once reaped; between the two it may drop out of one sample)."""
        pids = self.subtree(root)
        out, high = [], 0.0
        for t, snap in self.samples:
            if root not in snap and not any(p in snap for p in pids):
                continue
            high = max(high, sum(v for p, v in snap.items() if p in pids))
            out.append((t, high))
        return out


def at(series: list[tuple[float, float]], t: float) -> float:
    """A cumulative series interpolated at ``t`` (clamped to its ends)."""
    if not series:
        return 0.0
    if t <= series[0][0]:
        return series[0][1]
    if t >= series[-1][0]:
        return series[-1][1]
    lo, hi = 0, len(series) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if series[mid][0] <= t:
            lo = mid
        else:
            hi = mid
    (t0, c0), (t1, c1) = series[lo], series[hi]
    return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)


def between(series, a: float, b: float) -> float:
    return max(0.0, at(series, b) - at(series, a))


# ----- the ffmpeg/ffprobe wrapper ----------------------------------------------------------
def build_wrapper(bindir: Path) -> bool:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return False
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in ("ffmpeg", "ffprobe"):
        real = shutil.which(tool)
        if real is None:
            return False
        proc = subprocess.run([cc, "-O2", f'-DREAL="{real}"', "-o", str(bindir / tool),
                               str(ROOT / "benchmarks" / "toolwrap.c")], capture_output=True)
        if proc.returncode != 0:
            print(f"(no per-invocation ffmpeg accounting: {proc.stderr.decode()[-300:]})")
            return False
    return True


def read_tool_log(path: Path) -> list[dict]:
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split("\t", 7)
        if len(parts) < 8:
            continue
        argv = parts[7].split("\x1f")
        out.append({"start": float(parts[0]), "end": float(parts[1]), "pid": int(parts[2]),
                    "ppid": int(parts[3]), "cpu": float(parts[4]) + float(parts[5]),
                    "status": int(parts[6]), "argv": argv, "role": classify(argv)})
    return out


def classify(argv: list[str]) -> str:
    tool = Path(argv[0]).name
    args = " ".join(argv[1:])
    if tool == "ffprobe":
        return "probe"
    if "ebur128" in args:
        return "loudness"
    if "showwavespic" in args or args.endswith(".png"):
        return "waveform"
    if "volumedetect" in args or "astats" in args:
        return "levels"
    out = argv[-1]
    if "aac" in argv:
        return "encode aac"
    if "flac" in argv and not out.startswith("pipe:") and out != "-":
        return "encode flac"
    if out.startswith("pipe:") or out == "-":
        return "decode"
    return "other ffmpeg"


# ----- helpers ------------------------------------------------------------------------------
def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_http(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what} did not start")
            time.sleep(0.5)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
    except ProcessLookupError:
        pass


NAS_YAML = """nasSync:
  enabled: true
  collision: overwrite
  remoteRoots:
    audio: "{nas}"
  routes:
    - match: {{ kind: "audio" }}
      to: "${{remoteRoots.audio}}"
      name: "{{job_id}}/{{filename}}"
"""

BODY_START = {"STEP_START", "LOADED_INPUT", "STEP_INPUT", "RESOURCE_INIT_SUCCESS",
              "STEP_WORKER_STARTED"}
BODY_END = {"STEP_OUTPUT", "ASSET_MATERIALIZATION", "ASSET_CHECK_EVALUATION", "STEP_FAILURE",
            "STEP_UP_FOR_RETRY", "ASSET_MATERIALIZATION_PLANNED", "ASSET_OBSERVATION"}


def run_timelines(home: Path) -> list[dict]:
    """Every run of the instance: its job, partition, process id, run events and steps."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
    runs = []
    for rec in instance.get_run_records():
        run = rec.dagster_run
        pid, events, steps = None, {}, {}
        for e in instance.all_logs(run.run_id):
            if not e.is_dagster_event:
                continue
            kind = e.dagster_event.event_type_value.replace("PIPELINE_", "RUN_")
            if kind == "ENGINE_EVENT" and pid is None:
                m = re.search(r"Started process for run \(pid: (\d+)\)", e.message or "")
                if m:
                    pid = int(m.group(1))
            if e.step_key is None:
                events.setdefault(kind, e.timestamp)
                continue
            st = steps.setdefault(e.step_key, {"events": []})
            st["events"].append((e.timestamp, kind))
        for key, st in steps.items():
            evs = sorted(st["events"])
            start = next((t for t, k in evs if k == "STEP_START"), evs[0][0])
            end = next((t for t, k in reversed(evs) if k in ("STEP_SUCCESS", "STEP_FAILURE",
                                                             "STEP_SKIPPED")), evs[-1][0])
            first_out = next((t for t, k in evs if k in BODY_END and t >= start), end)
            body_start = max([t for t, k in evs if k in BODY_START and t <= first_out] or [start])
            steps[key] = {"start": start, "end": end, "body": (body_start, first_out)}
        selection = {k.to_user_string() for k in (run.asset_selection or ())}
        runs.append({"run_id": run.run_id, "job": run.job_name, "status": run.status.value,
                     "partition": run.tags.get("dagster/partition"), "pid": pid,
                     "assets": sorted(selection), "events": events, "steps": steps,
                     "create": rec.create_timestamp.timestamp()})
    return runs


STAGES = {  # step key -> the stage
    "source_audio": "decode + store source", "stems": "stems (run side: waiting on the service)",
    "variants": "mix + encode + tags", "manifest": "manifest", "nas_copy": "NAS copy"}


def stage_of(step: str) -> str:
    return STAGES.get(step, "checks")


def analyse(sampler: TreeSampler, roots: dict[str, int], runs: list[dict], tools: list[dict],
            window: tuple[float, float], tracks: set[str]) -> dict:
    t0, t1 = window
    tree = sampler.series(roots["dagster"])
    service = sampler.series(roots["service"])
    out = {"tree_cpu": between(tree, t0, t1), "service_cpu": between(service, t0, t1)}
    stage_cpu: dict[str, float] = defaultdict(float)
    stage_body: dict[str, float] = defaultdict(float)
    stage_wall: dict[str, float] = defaultdict(float)
    step_cpu: dict[str, float] = defaultdict(float)
    tool_cpu: dict[tuple[str, str], float] = defaultdict(float)
    tool_n: dict[tuple[str, str], int] = defaultdict(int)
    fixed = defaultdict(float)
    run_cpu_total = 0.0
    n_track_runs = n_steps = 0
    catalog_cpu = other_runs_cpu = 0.0
    proc_of_run = {r["pid"]: r for r in runs if r["pid"]}
    for r in runs:
        if not r["pid"] or r["pid"] not in sampler.parent:
            continue
        s = sampler.series(r["pid"])
        total = s[-1][1] if s else 0.0
        run_cpu_total += total
        if r["job"] != "ingest_track":
            if "catalog" in r["assets"]:
                catalog_cpu += total
            else:
                other_runs_cpu += total
            continue
        if r["partition"] not in tracks:
            continue
        n_track_runs += 1
        steps = sorted(r["steps"].items(), key=lambda kv: kv[1]["start"])
        in_steps = 0.0
        for key, st in steps:
            n_steps += 1
            cpu = between(s, st["start"], st["end"])
            body = between(s, *st["body"])
            in_steps += cpu
            stage_cpu[stage_of(key)] += cpu
            stage_body[stage_of(key)] += body
            stage_wall[stage_of(key)] += st["end"] - st["start"]
            step_cpu[key] += cpu
            fixed["in steps, outside the step's function"] += cpu - body
        first = steps[0][1]["start"] if steps else s[-1][0]
        fixed["process start -> first step"] += at(s, first)
        fixed["between and after steps"] += total - at(s, first) - in_steps
        ev = r["events"]
        started = sampler.started.get(r["pid"])
        for name, a, b in (("queued (enqueued -> starting)", ev.get("RUN_ENQUEUED"), ev.get("RUN_STARTING")),
                           ("launch (starting -> process started)", ev.get("RUN_STARTING"), started),
                           ("process started -> RUN_START", started, ev.get("RUN_START")),
                           ("RUN_START -> first step", ev.get("RUN_START"), first),
                           ("last step end -> RUN_SUCCESS", steps[-1][1]["end"] if steps else None,
                            ev.get("RUN_SUCCESS"))):
            if a is not None and b is not None:
                fixed[f"wall: {name}"] += b - a
    for tool in tools:
        r = proc_of_run.get(tool["ppid"])
        if tool["ppid"] == roots["service"] or tool["ppid"] in sampler.subtree(roots["service"]):
            where = "stems store (service)"
        elif r is None:
            where = "outside runs"
        elif r["job"] != "ingest_track":
            where = "catalog" if "catalog" in r["assets"] else "other runs"
        else:
            mid = (tool["start"] + tool["end"]) / 2
            key = next((k for k, st in r["steps"].items() if st["start"] <= mid <= st["end"]), None)
            where = stage_of(key) if key else "run, outside steps"
        tool_cpu[(where, tool["role"])] += tool["cpu"]
        tool_n[(where, tool["role"])] += 1
    n = max(n_track_runs, 1)
    out.update({
        "track_runs": n_track_runs, "steps": n_steps,
        "stage_cpu": dict(stage_cpu), "stage_body_cpu": dict(stage_body),
        "stage_wall": dict(stage_wall), "step_cpu": dict(step_cpu),
        "tools": [{"where": w, "role": k, "cpu": c, "count": tool_n[(w, k)]}
                  for (w, k), c in sorted(tool_cpu.items())],
        "run_processes_cpu": run_cpu_total, "catalog_cpu": catalog_cpu,
        "other_runs_cpu": other_runs_cpu,
        "resident_cpu": out["tree_cpu"] - run_cpu_total,
        "fixed_per_track": {k: v / n for k, v in fixed.items()},
    })
    return out


# ----- encode floor and tags ------------------------------------------------------------------
def encode_floor(songs: list[Path], work: Path, names: list[str], fmt: str, bitrate: str,
                 cores: int) -> dict:
    """ffmpeg alone encoding the same variants from float WAV files (one core per stream)."""
    import numpy as np

    from imaker import audio, devsong
    from imaker.variants import VARIANTS

    sys.path.insert(0, str(ROOT / "tests"))
    from oracles import mix  # the whole-track mix (the pipeline streams it)

    wavs = []
    src = work / "floor_wav"
    src.mkdir(parents=True, exist_ok=True)
    for song in songs:
        stems = {s: devsong.read_wav(song / f"{s}.wav")[0].T for s in devsong.SOURCES}
        for name in names:
            mixed, _ = mix(stems, VARIANTS[name])
            path = src / f"{song.name}_{name}.wav"
            devsong.write_wav(path, np.ascontiguousarray(mixed.T))
            wavs.append(path)
        del stems
    ext, codec_args, _ = audio.FORMATS[fmt]
    outdir = work / "floor_out"
    outdir.mkdir(exist_ok=True)

    def one(path: Path) -> tuple[float, float]:
        cmd = [shutil.which("ffmpeg"), "-nostdin", "-v", "error", "-y",
               "-i", str(path), *codec_args, *([] if fmt == "flac" else ["-b:a", bitrate]),
               str(outdir / (path.stem + ext))]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"encode floor: ffmpeg failed on {path}")
        return ru.ru_utime + ru.ru_stime, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cores) as pool:
        results = list(pool.map(one, wavs))
    return {"files": len(wavs), "cpu": sum(c for c, _ in results),
            "wall": time.perf_counter() - start, "streams_at_once": cores}


def tags_cost(outputs: Path, work: Path, repeats: int = 3) -> dict:
    """Write the pipeline's tags onto copies of the produced files, in this process."""
    from imaker import audio

    files = sorted(outputs.glob("*/files/audio/*.m4a"))
    copies = work / "tag_copies"
    copies.mkdir(exist_ok=True)
    total, count = 0.0, 0
    for i, f in enumerate(files):
        dest = copies / f"{i}.m4a"
        shutil.copy(f, dest)
        tags = audio.Tags(artist="imaker dev-song", title=f"{f.stem} (Instrumental)",
                          job_id=f.parents[2].name, variant="instrumental")
        tags.replaygain = {"gain_db": -3.21, "peak": 0.891}
        for _ in range(repeats):
            t = time.process_time()
            tags.write(dest, "m4a")
            total += time.process_time() - t
            count += 1
    return {"files": len(files), "cpu_per_file": total / max(count, 1)}


# ----- the run ------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--songs", type=int, default=8)
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-format", choices=["m4a", "flac"], default="m4a",
                   help="the bundles' audio (m4a: AAC 256k, what retrievers mostly deliver)")
    p.add_argument("--max-runs", type=int, default=None,
                   help="runs at once (MAX_CONCURRENT_RUNS) instead of the default, max(4, cores // 2)")
    p.add_argument("--sample-interval", type=float, default=0.05)
    p.add_argument("--idle-seconds", type=float, default=15.0,
                   help="resident processes' idle CPU measured over this before the drop")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--song-dir", type=Path, default=None,
                   help="render the songs into / reuse them from this folder "
                        "(benchmarks/render_songs.py; default: the work folder)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    from imaker import devsong, oracle

    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="imaker-ceiling-"))
    print(f"CPU {_cpu_model()}; {cores} cores; load average at start {loadavg()}; work {work}",
          flush=True)
    from render_songs import songs as rendered

    song_dir = args.song_dir or work / "songs"
    songs = rendered(song_dir, args.songs, args.seconds, args.seed, cores)
    repo = work / "models"
    oracle.write_spec(repo, [song_dir], ORACLE)
    staging = work / "staging"
    for song in songs:
        devsong.queue_song(song, staging, fmt=args.input_format, title=song.name)

    data, home = work / "data", work / "dagster_home"
    home.mkdir()
    _instance_yaml(home, args.max_runs)
    (work / "nas").mkdir()
    nas_yaml = work / "nas_sync_config.yaml"
    nas_yaml.write_text(NAS_YAML.format(nas=work / "nas"))
    bindir, tool_log = work / "bin", work / "tools.log"
    wrapped = build_wrapper(bindir)
    port = _free_port()
    env = dict(os.environ, **run_limit_env(args.max_runs), IMAKER_DATA=str(data),
               DAGSTER_HOME=str(home), IMAKER_ENV_FILE="",
               DEMUCS_MODEL=ORACLE, DEMUCS_MODEL_REPO=str(repo), DEMUCS_DEVICE="cpu",
               SEPARATOR_PORT=str(port), OUTPUT_AUDIO_FORMAT="m4a", OUTPUT_AUDIO_BITRATE="256k",
               NAS_SYNC_ENABLED="true", NAS_SYNC_CONFIG_PATH=str(nas_yaml),
               HF_HUB_OFFLINE="1", DAGSTER_DISABLE_TELEMETRY="1")
    for key in ("SEPARATOR_URL", "GENERATE_DRUMS_ONLY_VARIANT", "GENERATE_NO_DRUMS_VARIANT",
                "PRESERVE_STEMS", "NOTIFY_URLS"):
        env.pop(key, None)
    if wrapped:
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        env["IMAKER_BENCH_TOOL_LOG"] = str(tool_log)

    # the separation service: ours, so that its CPU is its own tree (a run would otherwise
    # start it as its child); torch imported at its start, before the timing
    service = subprocess.Popen([_script("imaker"), "separator", "serve", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, cwd=ROOT,
                               stdout=open(work / "service.log", "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    ui = _free_port()
    dev = subprocess.Popen(["bash", "-c", 'trap - INT TERM; exec "$0" "$@"', _script("dagster"),
                            "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p",
                            str(ui)], cwd=ROOT, env=env, stdout=open(work / "dagster_dev.log", "wb"),
                           stderr=subprocess.STDOUT, start_new_session=True)
    sampler = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", service, 180, "the separation service")
        wait_http(f"http://127.0.0.1:{ui}/server_info", dev, 300, "dagster dev")
        time.sleep(10)  # the daemon's first ticks
        roots = {"dagster": dev.pid, "service": service.pid}
        sampler = TreeSampler(roots, args.sample_interval)
        sampler.start()
        idle_a = time.time()
        time.sleep(args.idle_seconds)
        idle_b = time.time()
        queue = data / "queues" / "other"
        queue.mkdir(parents=True, exist_ok=True)
        bundles = sorted(staging.glob("job_*"))
        load_drop = loadavg()
        drop = time.time()
        for b in bundles:
            b.rename(queue / b.name)
        tracks = {b.name.removeprefix("job_") for b in bundles}
        from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
        from dagster._core.instance.ref import InstanceRef

        instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))
        done = data / "archive" / "done"
        tracks_done = catalog_done = None
        while True:
            if time.time() - drop > args.timeout:
                raise SystemExit("timed out")
            failed = list((data / "archive" / "failed").glob("job_*"))
            if failed:
                raise SystemExit(f"failed: {[f.name for f in failed]}; see {work}")
            if dev.poll() is not None:
                raise SystemExit((work / "dagster_dev.log").read_text()[-3000:])
            runs = instance.get_runs(filters=RunsFilter(job_name="ingest_track"))
            ok = {r.tags.get("dagster/partition") for r in runs
                  if r.status == DagsterRunStatus.SUCCESS}
            if tracks_done is None and tracks <= ok and all((done / f"job_{t}").is_dir()
                                                             for t in tracks):
                tracks_done = time.time()
            if tracks_done is not None:
                # the catalog refreshed after the last track (eager automation), then idle
                recs = instance.get_run_records()
                busy = [r for r in recs if r.dagster_run.status in (
                    DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING,
                    DagsterRunStatus.STARTED, DagsterRunStatus.NOT_STARTED)]
                cat = [r for r in recs if r.dagster_run.job_name != "ingest_track"
                       and r.dagster_run.status == DagsterRunStatus.SUCCESS
                       and r.create_timestamp.timestamp() >= tracks_done - 5]
                if cat and not busy:
                    catalog_done = max(r.end_time for r in cat if r.end_time)
                    break
                if time.time() - tracks_done > 120:
                    print("(no catalog run within 120 s of the last track)")
                    catalog_done = tracks_done
                    break
            time.sleep(0.5)
        time.sleep(max(0.0, 2 * args.sample_interval))
        end = time.time()
        load_end = loadavg()
        sampler.stop()
    finally:
        stop_group(dev)
        stop_group(service)
        if sampler is not None and sampler.is_alive():
            sampler.stop()

    runs = run_timelines(home)
    tools = read_tool_log(tool_log) if wrapped else []
    res = analyse(sampler, roots, runs, tools, (drop, end), tracks)
    idle = {"dagster": between(sampler.series(roots["dagster"]), idle_a, idle_b) / (idle_b - idle_a),
            "service": between(sampler.series(roots["service"]), idle_a, idle_b) / (idle_b - idle_a)}
    audio_s = args.songs * args.seconds
    minutes = audio_s / 60
    floor = encode_floor(songs, work, ["instrumental", "no_drums"], "m4a", "256k", cores)
    tags = tags_cost(data / "outputs", work)
    sep = [json.loads((data / "stems" / t / "stems.json").read_text()) for t in sorted(tracks)]
    oracle_wall = sum(m["separation_seconds"] for m in sep)

    window = end - drop
    pipeline_cpu = res["tree_cpu"] + res["service_cpu"]
    idle_cpu = (idle["dagster"] + idle["service"]) * window
    n = res["track_runs"]
    fixed = res["fixed_per_track"]
    fw_run = (fixed.get("process start -> first step", 0) + fixed.get("between and after steps", 0)
              + fixed.get("in steps, outside the step's function", 0))
    resident_per_track = res["resident_cpu"] / max(n, 1)
    resident_idle_adj = (res["resident_cpu"] - idle["dagster"] * window) / max(n, 1)
    report = {
        "cpu_model": _cpu_model(), "cores": cores, "songs": args.songs, "seconds": args.seconds,
        "input_format": args.input_format, "output": "m4a AAC 256k (instrumental, no_drums)",
        "max_runs": runs_at_once(args.max_runs), "load_average": {"start_of_drop": load_drop, "end": load_end},
        "wall": {"drop_to_tracks_done": tracks_done - drop, "drop_to_catalog_done": catalog_done - drop,
                 "measured_window": window},
        "audio_seconds": audio_s,
        "cpu": {"dagster_tree": res["tree_cpu"], "service": res["service_cpu"], "both": pipeline_cpu,
                "idle_rate_per_s": idle, "idle_over_window": idle_cpu},
        "audio_s_per_cpu_s": {"dagster_tree": audio_s / res["tree_cpu"],
                              "service": audio_s / max(res["service_cpu"], 1e-9),
                              "both": audio_s / pipeline_cpu},
        "stages": res, "oracle_separation_wall_s": oracle_wall,
        "encode_floor": floor, "tags": tags,
        "ratio_pipeline_to_floor": pipeline_cpu / floor["cpu"],
        "ratio_pipeline_to_floor_idle_adjusted": (pipeline_cpu - idle_cpu) / floor["cpu"],
        "fixed_per_track": {"run process outside step functions": fw_run,
                            "resident processes per track": resident_per_track,
                            "resident processes per track, idle rate subtracted": resident_idle_adj,
                            "total": fw_run + resident_per_track,
                            "total, idle rate subtracted": fw_run + resident_idle_adj},
        "tool_accounting": wrapped, "sample_interval_s": args.sample_interval,
    }
    print_report(report, minutes)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_report(r: dict, minutes: float) -> None:
    st = r["stages"]
    per = lambda cpu: cpu / minutes  # noqa: E731
    print(f"\n== ceiling: {r['songs']} x {r['seconds']:g} s generated songs ({r['input_format']} "
          f"bundles), oracle model, {r['output']}, sensor path (dagster dev), runs at once "
          f"{r['max_runs']}; CPU {r['cpu_model']}, {r['cores']} cores; load average "
          f"{r['load_average']['start_of_drop']} at the drop, {r['load_average']['end']} at the end")
    w = r["wall"]
    print(f"wall: drop -> last track done {w['drop_to_tracks_done']:.1f} s; -> catalog refreshed "
          f"{w['drop_to_catalog_done']:.1f} s ({r['audio_seconds'] / w['drop_to_tracks_done']:.2f} "
          "audio-s per wall-s)")
    c = r["cpu"]
    a = r["audio_s_per_cpu_s"]
    print(f"CPU over the window: dagster tree {c['dagster_tree']:.1f} s, separation service "
          f"{c['service']:.1f} s, both {c['both']:.1f} s; idle rates dagster "
          f"{c['idle_rate_per_s']['dagster']:.3f}, service {c['idle_rate_per_s']['service']:.3f} "
          f"CPU-s/s ({c['idle_over_window']:.1f} s over the window)")
    print(f"audio-seconds per CPU-second: whole pipeline {a['both']:.2f} (dagster tree "
          f"{a['dagster_tree']:.2f}, service {a['service']:.2f})")
    f = r["encode_floor"]
    print(f"encode floor: {f['files']} files, ffmpeg alone from WAV, {f['streams_at_once']} at once: "
          f"{f['cpu']:.1f} CPU-s ({per(f['cpu']):.2f} per audio minute), wall {f['wall']:.1f} s")
    print(f"ratio pipeline CPU / encode floor CPU: {r['ratio_pipeline_to_floor']:.2f} "
          f"(idle rate subtracted: {r['ratio_pipeline_to_floor_idle_adjusted']:.2f}; goal <= 1.25)")
    print("CPU-s per audio minute, per stage (step windows of the run processes):")
    checks = {k: v for k, v in st["step_cpu"].items() if stage_of(k) == "checks"}
    for name in sorted(st["stage_cpu"], key=lambda k: -st["stage_cpu"][k]):
        print(f"  {name:42s} {per(st['stage_cpu'][name]):6.3f}  (step function only "
              f"{per(st['stage_body_cpu'][name]):6.3f}; wall summed {st['stage_wall'][name]:.1f} s)")
    for k, v in sorted(checks.items()):
        print(f"    {k:40s} {per(v):6.3f}")
    print(f"  {'stems store (separation service tree)':42s} {per(c['service']):6.3f}  (of which "
          f"oracle + store wall {r['oracle_separation_wall_s']:.1f} s)")
    print(f"  {'catalog (its runs)':42s} {per(st['catalog_cpu']):6.3f}")
    print(f"  {'tags (measured apart, per file)':42s} {r['tags']['cpu_per_file'] * 1000:6.1f} ms "
          f"x {r['tags']['files']} files = {per(r['tags']['cpu_per_file'] * r['tags']['files']):.3f}")
    print(f"  {'resident processes (daemon, webserver, code server)':42s} {per(st['resident_cpu']):6.3f}")
    if st["tools"]:
        print("ffmpeg/ffprobe invocations (exact, wait4): where / what: CPU-s per audio minute (count)")
        for t in sorted(st["tools"], key=lambda t: -t["cpu"]):
            print(f"  {t['where']:36s} {t['role']:14s} {per(t['cpu']):6.3f}  ({t['count']})")
    fx = r["fixed_per_track"]
    print("fixed cost per track (CPU-s; goal <= 1.5):")
    for k, v in st["fixed_per_track"].items():
        unit = "s wall" if k.startswith("wall") else "CPU-s"
        print(f"  {k:52s} {v:6.2f} {unit}")
    print(f"  => run process outside step functions {fx['run process outside step functions']:.2f}"
          f" + resident per track {fx['resident processes per track']:.2f} = {fx['total']:.2f} CPU-s"
          f" (idle rate subtracted: {fx['total, idle rate subtracted']:.2f}); "
          f"{st['steps'] / max(st['track_runs'], 1):.0f} steps per track")


if __name__ == "__main__":
    sys.exit(main())
