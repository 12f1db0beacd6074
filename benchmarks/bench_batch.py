#!/usr/bin/env python
"""Our two ingestion paths vs the demucs CLI on the same generated files.

    python benchmarks/bench_batch.py [--tracks 8] [--seconds 60] [--long-seconds 1200]
                                     [--full-size] [--device cpu] [--no-sensor]
                                     [--no-cli] [--inputs generated|noise] [--song-dir DIR]

For each batch — ``--tracks`` x ``--seconds`` files, then (with ``--long-seconds``) one long
file on its own — it runs, on the same inputs, model repo, device and segment:

* the reference: ``python -m demucs`` over the files in one process (loads the model once,
  walks the files, writes 4 wav stems each);
* ours, CLI path: the same files as bundles in a queue, ``imaker ingest --once`` (claims
  them; a Dagster daemon's queue sensor requests one ``ingest_track`` run per track, the run
  queue runs up to MAX_CONCURRENT_RUNS at once; each run: decode, separation in the separation service —
  started fresh for the measurement, model loaded once —, FLAC stems, variants encoded +
  tagged, manifest, the asset checks, loudness + waveform metadata; then the catalog);
* ours, sensor path: ``dagster dev`` already running (not timed), the bundles dropped at
  once, timed until the last bundle is archived with its manifest;

and prints both wall times, the ratio, per-stage times summed over the tracks (from the
Dagster event log: step start to step end; steps of different tracks overlap in time when
several workers run, so the sums can exceed the wall time), and peak memory: the peak of
the whole process tree's summed RSS (sampled from /proc every 0.2 s) and the largest single
process (``ru_maxrss``). With ``--device cuda`` it also prints the speedup of our batched +
autocast inference over demucs' ``apply_model`` (``bench_separation.py --compare-batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_separation import make_input  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants."""
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        parents[ppid].append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except OSError:
            pass
        todo.extend(parents.get(pid, ()))
    return total


def _service_pid(port: int | None) -> int | None:
    if port is None:
        return None
    from imaker.separator.client import SeparatorClient

    health = SeparatorClient(url=None, port=port).health(timeout=0.5)
    return health["pid"] if health else None


def run_measured(cmd: list[str], log: Path, service_port: int | None = None, **kwargs) -> dict:
    """Wall seconds, peak RSS of the process tree plus the separation service (GiB), the
    largest process of the tree, exit code of one command."""
    start = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, **kwargs)
        peak = [0]
        done = threading.Event()
        service = [None]

        def sample() -> None:
            while not done.wait(0.2):
                if service[0] is None:
                    service[0] = _service_pid(service_port)
                extra = _tree_rss(service[0]) if service[0] else 0
                peak[0] = max(peak[0], _tree_rss(proc.pid) + extra)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    return {"wall": time.perf_counter() - start, "tree_rss": peak[0] / 2**30,
            "max_rss": usage.ru_maxrss / 2**20, "rc": os.waitstatus_to_exitcode(status)}


def step_times(home: Path) -> dict[str, float]:
    """Seconds per step key, summed over all runs in the instance at ``home``."""
    code = (
        "import json\n"
        "from dagster import DagsterInstance, DagsterEventType as T\n"
        "inst = DagsterInstance.get(); out = {}\n"
        "for rec in inst.get_run_records():\n"
        "    starts = {}\n"
        "    for e in inst.all_logs(rec.dagster_run.run_id):\n"
        "        if not e.is_dagster_event: continue\n"
        "        t = e.dagster_event.event_type\n"
        "        if t == T.STEP_START: starts[e.step_key] = e.timestamp\n"
        "        elif t in (T.STEP_SUCCESS, T.STEP_FAILURE) and e.step_key in starts:\n"
        "            out[e.step_key] = out.get(e.step_key, 0) + e.timestamp - starts[e.step_key]\n"
        "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, DAGSTER_HOME=str(home)), check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines()
                    if l.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def _precision(args) -> str:
    from imaker.separation import inference_plan

    cpu = {"auto": None, "true": True, "false": False}[args.cpu_autocast]
    return inference_plan(args.device, None, True, cpu)[1] or "fp32"


def _script(name: str) -> str:
    """A console script of this interpreter's environment (beside sys.executable), else the
    one on PATH (benchmarks/gpu.sh on a machine whose interpreter's folder is read-only)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or str(beside))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_inputs(folder: Path, count: int, seconds: float, kind: str, *, seed: int = 0,
                name: str = "track", song_dir: Path | None = None) -> list[Path]:
    """``count`` m4a inputs in ``folder/in/``: generated songs (seeds ``seed``.., rendered in
    parallel, not timed; their stems kept in ``song_dir``, default ``folder/songs/``, where
    songs already rendered are reused: render_songs.py) or tone + noise."""
    (folder / "in").mkdir(parents=True, exist_ok=True)
    paths = [folder / "in" / f"{name}{i:02d}.m4a" for i in range(count)]
    if kind == "noise":
        return [make_input(p, seconds) for p in paths]
    from imaker import devsong
    from render_songs import songs as rendered

    t0 = time.perf_counter()
    songs = rendered(song_dir or folder / "songs", count, seconds, seed)
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # one ffmpeg each
        list(pool.map(devsong.encode_mixture, songs, paths))
    print(f"generated {count} x {seconds:.0f} s songs (seeds {seed}..{seed + count - 1}) and "
          f"their AAC inputs in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


def _stop_service(port: int) -> None:
    pid = _service_pid(port)
    if pid:
        os.kill(pid, 15)


def _bundles(queue: Path, inputs: list[Path], suffix: str = "") -> list[Path]:
    out = []
    for src in inputs:
        bundle = queue / f"job_{src.stem}{suffix}.tmp"
        bundle.mkdir(parents=True)
        shutil.copy(src, bundle / "audio.m4a")
        (bundle / "job.json").write_text(json.dumps({
            "schema_version": 1, "job_id": f"{src.stem}{suffix}", "source_type": "local",
            "title": src.stem, "artist": "Bench", "audio": "audio.m4a"}))
        out.append(bundle)
    return out


def overheads(home: Path, data: Path) -> dict[str, float]:
    """Mean seconds per track: claimed -> stems step start, stems end -> manifest end."""
    code = (
        "import json, sys, calendar, time\n"
        "from pathlib import Path\n"
        "from dagster import DagsterInstance, DagsterEventType as T\n"
        "inst = DagsterInstance.get(); a = []; b = []\n"
        "for rec in inst.get_run_records():\n"
        "    run = rec.dagster_run\n"
        "    if run.job_name != 'ingest_track' or run.status.value != 'SUCCESS': continue\n"
        "    job = run.tags['dagster/partition']\n"
        "    ev = {}\n"
        "    for e in inst.all_logs(run.run_id):\n"
        "        if e.is_dagster_event and e.step_key in ('stems', 'manifest'):\n"
        "            ev[(e.step_key, e.dagster_event.event_type)] = e.timestamp\n"
        "    claim = json.loads((Path(sys.argv[1]) / 'archive' / 'done' / f'job_{job}' / '.imaker' / 'claim.json').read_text())\n"
        "    claimed = calendar.timegm(time.strptime(claim['claimed_at'], '%Y-%m-%dT%H:%M:%SZ'))\n"
        "    a.append(ev[('stems', T.STEP_START)] - claimed)\n"
        "    b.append(ev[('manifest', T.STEP_SUCCESS)] - ev[('stems', T.STEP_SUCCESS)])\n"
        "print(json.dumps({'seen_to_stems': sum(a) / max(len(a), 1), 'stems_to_manifest': sum(b) / max(len(b), 1)}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True,
                          text=True, env=dict(os.environ, DAGSTER_HOME=str(home)), check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sensor_path(work: Path, inputs: list[Path], env: dict, port: int) -> dict:
    """`dagster dev` running (started and warmed up outside the timing); drop every bundle at
    once; time until the last one is archived with its manifest."""
    import urllib.request

    data = Path(env["IMAKER_DATA"])
    queue = data / "queues" / "other"
    queue.mkdir(parents=True, exist_ok=True)
    tmps = _bundles(queue, inputs, "_s")
    ui = _free_port()
    log = open(work / "dagster_dev.log", "wb")
    dev = subprocess.Popen([_script("dagster"), "dev", "-w",
                            str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(ui)],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ui}/server_info", timeout=5)
                break
            except OSError:
                assert time.time() < deadline and dev.poll() is None, "dagster dev did not start"
                time.sleep(1)
        time.sleep(10)  # the daemon's first ticks
        peak, done_flag = [0], threading.Event()

        def sample() -> None:
            while not done_flag.wait(0.2):
                pid = _service_pid(port)
                peak[0] = max(peak[0], _tree_rss(dev.pid) + (_tree_rss(pid) if pid else 0))

        threading.Thread(target=sample, daemon=True).start()
        start = time.perf_counter()
        for tmp in tmps:
            tmp.rename(tmp.with_name(tmp.name.removesuffix(".tmp")))
        from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
        from dagster._core.instance.ref import InstanceRef

        instance = DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"]))
        done = data / "archive" / "done"
        names = [t.name.removesuffix(".tmp") for t in tmps]

        def finished() -> bool:  # archived, and its run over (nas_copy runs after the archive)
            if not all((done / n).is_dir() for n in names):
                return False
            runs = instance.get_runs(filters=RunsFilter(job_name="ingest_track"))
            ok = {r.tags.get("dagster/partition") for r in runs
                  if r.status == DagsterRunStatus.SUCCESS}
            return all(n.removeprefix("job_") in ok for n in names)

        while not finished():
            failed = list((data / "archive" / "failed").glob("job_*"))
            assert not failed, f"failed: {failed}"
            assert dev.poll() is None, (work / "dagster_dev.log").read_text()[-3000:]
            time.sleep(0.5)
        wall = time.perf_counter() - start
        done_flag.set()
    finally:
        # `dagster dev` started from a script ignores SIGTERM (its children do not)
        os.killpg(dev.pid, 15)
        try:
            dev.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, 9)
            dev.wait()
    return {"wall": wall, "tree_rss": peak[0] / 2**30, "max_rss": 0.0, "rc": 0}


def _instance_yaml(home: Path, max_runs: int | None) -> None:
    """The project's dagster.yaml (its run limit comes from MAX_CONCURRENT_RUNS:
    ``run_limit_env``)."""
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())


def runs_at_once(max_runs: int | None) -> int:
    """``--max-runs``, else the setting's default for this host (max(4, cores // 2))."""
    from imaker.settings import default_max_runs, host_cores

    return max_runs or default_max_runs(host_cores())


def run_limit_env(max_runs: int | None) -> dict:
    """What dagster.yaml reads, for the processes a benchmark starts itself (`dagster
    dev`): the run limit (and nothing bounds the `gpu` pool)."""
    return {"MAX_CONCURRENT_RUNS": str(runs_at_once(max_runs))}


def compare(work: Path, inputs: list[Path], name: str, repo: Path, args, label: str) -> dict:
    demucs = run_measured([sys.executable, "-m", "demucs", "-n", name, "--repo", str(repo),
                           "-d", args.device, "-o", str(work / "demucs_out"), *map(str, inputs)],
                          work / "demucs.log")
    if demucs["rc"] != 0:
        raise SystemExit((work / "demucs.log").read_text()[-2000:])
    data, home = work / "data", work / "dagster_home"
    home.mkdir()
    _instance_yaml(home, args.max_runs)
    queue = data / "queues" / "other"
    for tmp in _bundles(queue, inputs):
        tmp.rename(tmp.with_name(tmp.name.removesuffix(".tmp")))
    port = _free_port()  # a separation service of its own, started (and loaded) on first use
    env = dict(os.environ, **run_limit_env(args.max_runs), IMAKER_DATA=str(data),
               DAGSTER_HOME=str(home), DEMUCS_MODEL=name,
               DEMUCS_MODEL_REPO=str(repo), DEMUCS_DEVICE=args.device, HF_HUB_OFFLINE="1",
               SEPARATOR_PORT=str(port), DEMUCS_CPU_AUTOCAST=args.cpu_autocast,
               DEMUCS_BACKEND=args.backend,
               DAGSTER_DISABLE_TELEMETRY="1")
    env.pop("SEPARATOR_URL", None)
    # the converted network (DEMUCS_BACKEND) is made once per model and cached beside the
    # weights: done here, outside the timing, as on any install after its first track
    # (its cost is in bench_backends.py); each service start still compiles it (timed).
    # Noise, not silence: a silent input returns zeros before the network runs
    warm = ("import numpy as np; from imaker import separation; "
            "from imaker.settings import load_settings; s = load_settings(); "
            "m = separation.load_model(s.separation.model, s.separation.model_repo, s.separation.device); "
            "w = (0.1 * np.random.default_rng(0).standard_normal((2, 44100 * 2))).astype(np.float32); "
            "separation.separate(m, w, "
            "cpu_autocast=s.separation.cpu_autocast, backend=s.separation.backend)")
    subprocess.run([sys.executable, "-c", warm], env=env, check=True)
    ours = cli_overheads = None
    if not args.no_cli:
        ours = run_measured([_script("imaker"), "ingest", "--once"],
                            work / "imaker.log", service_port=port, env=env, cwd=ROOT)
        if ours["rc"] != 0:
            raise SystemExit((work / "imaker.log").read_text()[-3000:])
        cli_overheads = overheads(home, data)
        _stop_service(port)
    sensor = None
    if not args.no_sensor:
        port2 = _free_port()
        shome, sdata = work / "sensor_home", work / "sensor_data"
        shome.mkdir()
        _instance_yaml(shome, args.max_runs)
        senv = dict(env, IMAKER_DATA=str(sdata), DAGSTER_HOME=str(shome), SEPARATOR_PORT=str(port2))
        sensor = sensor_path(work, inputs, senv, port2)
        sensor["overheads"] = overheads(shome, sdata)
        _stop_service(port2)
    job_suffix = ""
    if ours is None:  # the stage sums below come from the path that ran (its job ids: "_s")
        home, data, job_suffix = shome, sdata, "_s"
    sep = sum(json.loads((data / "stems" / f"{s.stem}{job_suffix}" / "stems.json").read_text())
              ["separation_seconds"] for s in inputs)
    steps = step_times(home)
    stages: dict[str, float] = defaultdict(float)
    for key, seconds in steps.items():
        stages["checks" if "_" in key and key not in ("source_audio", "nas_copy") else key] += seconds
    print(f"\n== {label}; model {name}; device {args.device}; cores {os.cpu_count()}; "
          f"CPU {_cpu_model()}; runs at once {runs_at_once(args.max_runs)}; "
          f"ours {_precision(args)} (DEMUCS_CPU_AUTOCAST={args.cpu_autocast}, "
          f"DEMUCS_BACKEND={args.backend}), CLI fp32")
    print(f"demucs CLI (one process, 4 wav stems per file): {demucs['wall']:8.1f} s   "
          f"peak RSS {demucs['tree_rss']:5.2f} GiB (largest process {demucs['max_rss']:.2f})")
    if ours is not None:
        print(f"imaker ingest --once (full pipeline):           {ours['wall']:8.1f} s   "
              f"peak RSS {ours['tree_rss']:5.2f} GiB (largest process {ours['max_rss']:.2f})")
        print(f"ratio ours / demucs CLI: {ours['wall'] / demucs['wall']:.3f}   per track: bundle "
              f"seen -> stems start {cli_overheads['seen_to_stems']:.1f} s, stems end -> "
              f"manifest {cli_overheads['stems_to_manifest']:.1f} s")
    if sensor is not None:
        print(f"sensor path (dagster dev running, dropped at once): {sensor['wall']:8.1f} s   "
              f"peak RSS {sensor['tree_rss']:5.2f} GiB   ratio {sensor['wall'] / demucs['wall']:.3f}"
              f"   per track: seen -> stems {sensor['overheads']['seen_to_stems']:.1f} s, "
              f"stems -> manifest {sensor['overheads']['stems_to_manifest']:.1f} s")
    print("per-stage seconds summed over tracks: " + ", ".join(
        f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])) +
        f"; of which model separation {sep:.1f}")
    timed = ours or sensor
    return {"label": label, "demucs": demucs, "ours": ours, "ratio": timed["wall"] / demucs["wall"],
            "sensor": sensor, "overheads": cli_overheads,
            "stages": dict(stages), "separation_seconds": sep}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--long-seconds", type=float, default=0.0,
                   help="then one long track on its own (e.g. 1200 = 20 minutes)")
    p.add_argument("--full-size", action="store_true", help="real HTDemucs architecture, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-sensor", action="store_true", help="skip the sensor path")
    p.add_argument("--max-runs", type=int, default=None,
                   help="runs at once (MAX_CONCURRENT_RUNS) instead of the default, max(4, cores // 2)")
    p.add_argument("--cpu-autocast", choices=["auto", "true", "false"], default="auto",
                   help="DEMUCS_CPU_AUTOCAST for our side (auto: bf16 when the CPU has it "
                        "natively; false: fp32 like the CLI)")
    from imaker.settings import BACKENDS

    p.add_argument("--backend", choices=list(BACKENDS),
                   default="auto", help="DEMUCS_BACKEND for our side (imaker.backends)")
    p.add_argument("--inputs", choices=["generated", "noise"], default="generated",
                   help="generated: songs composed and rendered by `imaker dev-song` (seeds "
                        "0..N-1; needs FluidSynth, setup.sh --test), as AAC 256k; noise: a "
                        "tone + pink noise (the AAC encoder's worst case)")
    p.add_argument("--song-dir", type=Path, default=None,
                   help="generated songs: render into / reuse from this folder "
                        "(benchmarks/render_songs.py; default: the work folder)")
    p.add_argument("--no-cli", action="store_true",
                   help="skip the CLI path (`imaker ingest --once`): the sensor path only")
    p.add_argument("--no-compare-batch", action="store_true",
                   help="on CUDA, skip bench_separation.py --compare-batch")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    if args.no_cli and args.no_sensor:
        p.error("--no-cli and --no-sensor leave nothing to compare")

    from imaker.devmodel import HTDEMUCS_SIZE, build_model_repo

    work = Path(tempfile.mkdtemp(prefix="imaker-batch-"))
    size = HTDEMUCS_SIZE if args.full_size else {}
    name = "random_htdemucs" if args.full_size else "tiny_htdemucs"
    repo = build_model_repo(work / "models", name, **size)
    results = []
    if args.tracks:
        batch = work / "batch"
        (batch / "in").mkdir(parents=True)
        inputs = make_inputs(batch, args.tracks, args.seconds, args.inputs,
                             song_dir=args.song_dir)
        results.append(compare(batch, inputs, name, repo, args,
                               f"{args.tracks} x {args.seconds:.0f} s {args.inputs}"))
    if args.long_seconds:
        long = work / "long"
        (long / "in").mkdir(parents=True)
        results.append(compare(long, make_inputs(long, 1, args.long_seconds, args.inputs,
                                                 seed=100, name="long"),
                               name, repo, args, f"1 x {args.long_seconds:.0f} s {args.inputs}"))
    if args.device.startswith("cuda") and not args.no_compare_batch:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_separation.py"),
                        "--compare-batch", "0,1,8,16", "--seconds", "60", "--device", args.device,
                        *(["--full-size"] if args.full_size else [])], check=False)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
