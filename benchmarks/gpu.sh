#!/usr/bin/env bash
# The whole GPU measurement in one command (< 8 minutes on one H100/H200):
#   8 x 4-minute tracks, full-size HTDemucs architecture (random weights):
#   * `python -m demucs` (one process, fp32 apply_model) vs our sensor path (`dagster dev`
#     running, the 8 bundles dropped at once, the separation service on the GPU batching
#     the windows of two tracks per forward pass, bf16 autocast) -> wall times, throughput
#     in audio-seconds per second, the ratio;
#   * SNR of our batched/autocast stems against fp32 apply_model, and inference-only times
#     per batch size (bench_separation.py --compare-batch).
#
# Where: any Linux host with an NVIDIA GPU and a Python 3.11/3.12 that has a CUDA torch.
#   PYTHON=/path/to/python bash benchmarks/gpu.sh          (default: .venv/bin/python)
# The packages besides torch (dagster, demucs, ...) and ffmpeg/ffprobe must be there:
# `pip install -e .` + apt's ffmpeg on a connected host, or, on an offline GPU machine
# (the workplace's device image: Python 3.12 with torch, numpy, pandas, ...), the folder
# .gpu/ made beforehand where PyPI is reachable by benchmarks/gpu_wheels.sh: its wheels are
# installed here into /tmp/imaker-site, its ffmpeg + ffprobe unpacked into /tmp/imaker-ffbin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
source benchmarks/gpu_env.sh
export HF_HUB_OFFLINE=1 DAGSTER_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
"$PY" - <<'PY'
import importlib.metadata as md

import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
# fail here, not minutes into the run, when a package is missing or of a wrong version
import dagster, dagster_webserver, demucs.api, imaker.cli, imaker_assets.definitions  # noqa
import grpc_health.v1.health_pb2_grpc  # noqa: refuses grpcio/protobuf older than its own
print("versions:", ", ".join(f"{d} {md.version(d)}" for d in (
    "instrumental-maker", "dagster", "demucs", "numpy", "torchaudio", "pandas", "click",
    "grpcio", "protobuf", "pydantic", "typing_extensions", "huggingface_hub")))
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
OUT=${OUT:-/tmp/imaker-gpu}
mkdir -p "$OUT"
# demucs CLI vs our sensor path (and the CLI path), same inputs, model repo and GPU
# (--inputs noise: the noise inputs of the figures so far; generated songs need FluidSynth,
# which the offline GPU image may not have)
timeout 420 "$PY" benchmarks/bench_batch.py --tracks 8 --seconds 240 --full-size --device cuda \
    --inputs noise \
    --json "$OUT/gpu_batch.json" 2>&1 | tee "$OUT/gpu_batch.log"
"$PY" - "$OUT/gpu_batch.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    audio = 8 * 240.0
    print(f"{r['label']}: demucs CLI {audio / r['demucs']['wall']:.1f} audio-s/s, ours (CLI path) "
          f"{audio / r['ours']['wall']:.1f} audio-s/s"
          + (f", ours (sensor path) {audio / r['sensor']['wall']:.1f} audio-s/s "
             f"-> {r['demucs']['wall'] / r['sensor']['wall']:.2f}x the demucs CLI"
             if r.get("sensor") else ""))
PY
# quality: our CUDA path (batched windows, bf16 autocast) against fp32 apply_model, per stem
"$PY" - <<'PY'
import tempfile
from pathlib import Path

import numpy as np
import torch
from demucs.apply import apply_model

from imaker import separation
from imaker.devmodel import HTDEMUCS_SIZE, build_model_repo

repo = build_model_repo(Path(tempfile.mkdtemp()), "random_htdemucs", **HTDEMUCS_SIZE)
loaded = separation.load_model("random_htdemucs", repo, "cuda")
rng = np.random.default_rng(0)
n = 30 * loaded.samplerate
t = np.arange(n) / loaded.samplerate
mono = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * rng.standard_normal(n)
wav = np.stack([mono, 0.7 * mono]).astype(np.float32)
ours = separation.separate(loaded, wav, shifts=0)          # auto: batch 8 + bf16 on CUDA
mix = torch.from_numpy(wav)
ref_mono = mix.mean(0)
mean, std = ref_mono.mean(), ref_mono.std()
with torch.inference_mode():
    ref = apply_model(loaded.model, ((mix - mean) / std)[None], device="cuda", shifts=0,
                      split=True, overlap=0.25, progress=False)[0].cpu() * std + mean
for i, name in enumerate(loaded.sources):
    r = ref[i].double().numpy()
    e = ours[name].astype(np.float64)
    snr = 10 * np.log10((r ** 2).sum() / max(((r - e) ** 2).sum(), 1e-30))
    print(f"SNR {name} (ours CUDA bf16 batched vs fp32 apply_model): {snr:.1f} dB")
PY
