#!/usr/bin/env python
"""CPU inference backends vs PyTorch eager fp32 ``apply_model`` (issue 15).

    python benchmarks/bench_backends.py --full-size --seconds 60 --rounds 2 \
        [--candidates apply,torch,onnx,openvino,aoti,onnx-int8,torch-int8,torch-bf16]
    python benchmarks/bench_backends.py --full-size --layout openvino --seconds 20

Every candidate runs in a fresh process (so peak RSS is its own), candidates interleaved
round by round (A, B, C, A, B, C) on the same generated input (tone + noise, seed 0), the
same model repo and ``random`` seed (same shift offset), ``shifts=1, overlap=0.25``:

* ``apply``: ``demucs.apply.apply_model`` fp32 (the reference; its stems are saved once and
  every other candidate's SNR per stem is computed against them);
* ``torch``: our segment loop (``imaker.fast_apply``, 1 window per pass), PyTorch eager fp32;
* ``onnx`` / ``openvino`` / ``aoti``: our segment loop with the core network converted
  (``imaker.backends``: ONNX Runtime, OpenVINO f32, AOTInductor-compiled ``torch.export``);
* ``onnx-int8``: ONNX Runtime on the ONNX file dynamically quantized to int8
  (``onnxruntime.quantization.quantize_dynamic``: MatMul/Conv weights int8);
* ``torch-int8``: PyTorch eager with ``torch.ao.quantization.quantize_dynamic`` (Linear);
* ``torch-bf16``: PyTorch eager under bf16 autocast (only meaningful with native bf16);
* ``openvino-bf16``: OpenVINO with ``INFERENCE_PRECISION_HINT=bf16`` (native bf16 CPUs:
  what ``DEMUCS_BACKEND=auto`` runs where ``DEMUCS_CPU_AUTOCAST=auto`` picks bf16).

Per candidate: first use (conversion when the cache is cold, then session creation /
compilation for the thread count — round 1 shows the cold cost, later rounds the cached
one), a warm-up separation of one window, the timed separation (wall), the process's peak
RSS, SNR per stem against the reference. ``--layout B``: concurrent separations x threads
on this machine's cores for backend B (one process, Python threads like the service).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = "apply,torch,onnx,openvino,aoti,onnx-int8,torch-int8,torch-bf16,openvino-bf16"


def signal(seconds: float, samplerate: int = 44100):
    import numpy as np

    rng = np.random.default_rng(0)
    n = int(seconds * samplerate)
    t = np.arange(n) / samplerate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(n)
    return np.stack([mono, 0.7 * mono]).astype(np.float32)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _quantized_onnx(src: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = src.with_name(src.stem + "-int8.onnx")
    if not dst.is_file():
        tmp = src.with_name(src.stem + f"-int8.{os.getpid()}.part.onnx")
        quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8)
        os.replace(tmp, dst)
    return dst


def child(args) -> None:
    import numpy as np
    import torch

    from imaker import backends, separation

    cand = args.child
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = separation.load_model(args.model, Path(args.repo), "cpu")
    load_s = time.perf_counter() - t0
    subs = list(getattr(loaded.model, "models", [loaded.model]))
    kwargs: dict = {"batch_size": 1, "cpu_autocast": False, "backend": "torch"}
    first = {"convert_s": 0.0, "prepare_s": 0.0, "cached": True}
    t = time.perf_counter()
    if cand == "apply":
        kwargs["batch_size"] = 0
    elif cand == "torch-bf16":
        kwargs["cpu_autocast"] = True
    elif cand == "torch-int8":
        for i, sub in enumerate(subs):
            q = torch.ao.quantization.quantize_dynamic(sub, {torch.nn.Linear},
                                                       dtype=torch.qint8)
            loaded.model.models[i] = q
        first["cached"] = False  # quantizing takes ~a second: redone at every start
    elif cand in ("onnx", "openvino", "aoti", "onnx-int8", "openvino-bf16"):
        backend = {"onnx-int8": "onnx", "openvino-bf16": "openvino"}.get(cand, cand)
        precision = "bf16" if cand == "openvino-bf16" else "f32"
        runners = {}
        for sub in subs:
            path = backends.artifact_path(sub, loaded.repo, backend)
            first["cached"] = first["cached"] and path.is_file()
            tc = time.perf_counter()
            backends.ensure_artifact(sub, loaded.repo, backend)
            if cand == "onnx-int8":
                path = _quantized_onnx(path)
            first["convert_s"] += time.perf_counter() - tc
            run = backends.CoreRunner(sub, backend, path, precision)
            tp_ = time.perf_counter()
            run.warm_up(torch.get_num_threads())
            first["prepare_s"] += time.perf_counter() - tp_
            runners[id(sub)] = run
        kwargs["backend"] = backend
        kwargs["cpu_autocast"] = precision == "bf16"
        backends.prepare = lambda *a, **k: (lambda sub: runners[id(sub)])
    first["total_s"] = time.perf_counter() - t
    separation.separate(loaded, signal(8.0), **kwargs)  # warm-up: one window
    wav = signal(args.seconds)
    random.seed(0)
    t = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = separation.separate(loaded, wav, **kwargs)
    wall = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime
    stems = np.stack([out[k] for k in loaded.sources])
    ref = Path(args.work) / "reference.npy"
    snr = None
    if cand == "apply" and not ref.is_file():
        np.save(ref, stems)
    if ref.is_file():
        r = np.load(ref)
        snr = [float(10 * np.log10((r[i] ** 2).sum() / max(((r[i] - stems[i]) ** 2).sum(),
                                                              1e-30)))
               for i in range(len(r))]
    print(json.dumps({"candidate": cand, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _peak_mb(),
                      "load_s": load_s, "first_use": first, "snr_db": snr,
                      "threads": torch.get_num_threads(),
                      "load1": os.getloadavg()[0]}))


def layout(args) -> None:
    """k concurrent separations x (cores // k) threads, in one process like the service."""
    import torch

    from imaker import backends, separation

    loaded = separation.load_model(args.model, Path(args.repo), "cpu")
    cores = os.cpu_count() or 1
    wav = signal(args.seconds)
    backend = args.layout
    for sub in getattr(loaded.model, "models", [loaded.model]):
        if backend != "torch":
            for n in {1, cores}:
                backends.runner(sub, backend, loaded.repo).warm_up(n)
    results = {}
    for rnd in range(args.rounds):
        for k in sorted({1, cores}):
            threads = max(1, cores // k)

            def one():
                torch.set_num_threads(threads)
                separation.separate(loaded, wav, batch_size=1, cpu_autocast=False,
                                     backend=backend, threads=lambda: threads)

            t = time.perf_counter()
            if k == 1:
                for _ in range(cores):  # the same amount of work: `cores` tracks
                    one()
            else:
                workers = [threading.Thread(target=one) for _ in range(k)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            wall = time.perf_counter() - t
            key = f"{k} x {threads} thread(s)"
            results.setdefault(key, []).append(round(wall, 2))
            print(json.dumps({"backend": backend, "layout": key, "tracks": cores,
                              "seconds_each": args.seconds, "wall_s": wall,
                              "load1": os.getloadavg()[0]}), flush=True)
    print(json.dumps({"backend": backend, "summary": results}))


def windows(args) -> None:
    """One process, one window of the model, each engine's forward timed in turn
    (A, B, C, A, B, C ...): the relative cost per window with the least drift of the
    machine's load between candidates."""
    import torch

    from imaker import backends, htcore, separation

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = separation.load_model(args.model, Path(args.repo), "cpu")
    sub = loaded.model.models[0]
    torch.manual_seed(0)
    mix = torch.randn(1, sub.audio_channels, htcore.training_length(sub))
    engines = {"torch": sub}
    for b in args.candidates.split(","):
        if b in ("onnx", "openvino", "aoti"):
            engines[b] = backends.runner(sub, b, loaded.repo)
    with torch.inference_mode():
        for f in engines.values():
            f(mix)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.rounds):
            for k, f in engines.items():
                t = time.perf_counter()
                f(mix)
                times[k].append(time.perf_counter() - t)
            print(json.dumps({k: round(v[-1], 3) for k, v in times.items()}
                             | {"load1": os.getloadavg()[0]}), flush=True)
    base = min(times["torch"])
    for k, v in times.items():
        print(f"  {k:9s} per window min {min(v):6.3f} s  median {sorted(v)[len(v) // 2]:6.3f}"
              f" s  x{base / min(v):.2f} vs torch eager (threads {torch.get_num_threads()})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--full-size", action="store_true",
                   help="the released htdemucs architecture (devmodel.HTDEMUCS_SIZE), random weights")
    p.add_argument("--model", default=None)
    p.add_argument("--repo", default=None)
    p.add_argument("--work", default=None, help="work folder (kept; reused: cached conversions)")
    p.add_argument("--candidates", default=DEFAULT)
    p.add_argument("--layout", default=None, metavar="BACKEND")
    p.add_argument("--windows", action="store_true",
                   help="per-window forward times of the engines in one process, interleaved")
    p.add_argument("--threads", type=int, default=None,
                   help="torch/engine threads (default: torch's, = the cores)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="imaker-backends-"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    if args.repo is None:
        from imaker.devmodel import HTDEMUCS_SIZE, build_model_repo

        size = HTDEMUCS_SIZE if args.full_size else {}
        name = "random_htdemucs" if args.full_size else "tiny_htdemucs"
        if not (work / "models" / f"{name}.yaml").is_file():
            build_model_repo(work / "models", name, **size)
        args.repo, args.model = str(work / "models"), name
    args.model = args.model or "htdemucs"
    if args.layout:
        layout(args)
        return 0
    if args.windows:
        windows(args)
        return 0
    model_name = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if ln.startswith("Model name")), "?")
    print(f"CPU: {model_name}, {os.cpu_count()} cores; {args.seconds:.0f} s input; "
          f"model {args.model} ({args.repo}); work {work}", flush=True)
    cands = args.candidates.split(",")
    if "apply" in cands:  # the reference first
        cands.remove("apply")
        cands.insert(0, "apply")
    results: dict[str, list[dict]] = {c: [] for c in cands}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for rnd in range(args.rounds):
        for cand in cands:
            cmd = [sys.executable, __file__, "--child", cand, "--model", args.model,
                   "--repo", args.repo, "--work", str(work), "--seconds", str(args.seconds)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if out.returncode != 0:
                print(f"round {rnd + 1} {cand}: FAILED\n{out.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[cand].append(res)
            snr = res["snr_db"]
            print(f"round {rnd + 1} {cand:10s} wall {res['wall_s']:7.2f} s  CPU {res['cpu_s']:7.2f} s"
                  f"  peak RSS "
                  f"{res['peak_rss_mb']:6.0f} MiB  first use {res['first_use']['total_s']:6.1f} s"
                  f" (convert {res['first_use']['convert_s']:.1f} s, cached before: "
                  f"{res['first_use']['cached']})  SNR "
                  f"{'/'.join(f'{s:.1f}' for s in snr) if snr else '-'} dB  load {res['load1']:.2f}",
                  flush=True)
    base = min((r["wall_s"] for r in results.get("apply", [])), default=None)
    print("\nsummary (min wall; speed-up vs apply_model fp32):")
    for cand, rs in results.items():
        if not rs:
            continue
        best = min(r["wall_s"] for r in rs)
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in rs)
        cpu = min(r["cpu_s"] for r in rs)
        base_cpu = min((r["cpu_s"] for r in results.get("apply", [])), default=float("nan"))
        print(f"  {cand:10s} min {best:7.2f} s (all {walls}) CPU min {cpu:.1f} s "
              f"(x{base_cpu / cpu:.2f})"
              f"  x{(base / best) if base else float('nan'):.2f}  peak RSS "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} MiB  loads "
              + ", ".join(f"{r['load1']:.1f}" for r in rs))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
