"""RoFormer separation speed on this CPU: ours (imaker.roformer, torch fp32; optionally
OpenVINO) against the reference implementation (audio-separator 0.47.1's MDXC path, the
test extra), at the published sizes with random weights, plus the SNR between them.

    .venv/bin/python benchmarks/bench_roformer.py [--model kim|ep317|all] [--seconds S]
        [--threads N] [--repeat R] [--openvino] [--bf16]

Sizes from the released configs (ZFTurbo's Music-Source-Separation-Training):
``configs/KimberleyJensen/config_vocals_mel_band_roformer_kj.yaml`` (Mel-Band, dim 384,
depth 6, 60 bands; inference dim_t 256 -> 2.55 s windows, num_overlap 2) and
``configs/viperx/model_bs_roformer_ep_317_sdr_12.9755.yaml`` (BS, dim 512, depth 12,
62 bands; dim_t 801 -> 8 s windows, num_overlap 2). The reference runs from a model
folder pre-seeded with ``download_checks.json`` (offline), through
``Separator.load_model`` and the loaded ``MDXCSeparator.demix``; ours through
``RoformerModel.separate``. Runs alternate (ours, reference, ...) and the best of
``--repeat`` is reported, as seconds of computation per second of audio: wall-clock
(``*_s_per_audio_s``) and this process's CPU time (``*_cpu_s_per_audio_s``, user +
system of all its threads). On a machine shared with other work, ``--threads 1`` and the
CPU-time figures measure the work itself (a descheduled thread does not count); with
several threads, OpenMP's spin-waiting inflates CPU time, so read wall-clock there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

KIM = """\
audio: {chunk_size: 352800, dim_f: 1024, dim_t: 256, hop_length: 441, n_fft: 2048,
        num_channels: 2, sample_rate: 44100, min_mean_abs: 0.0}
model:
  dim: 384
  depth: 6
  stereo: true
  num_stems: 1
  time_transformer_depth: 1
  freq_transformer_depth: 1
  num_bands: 60
  dim_head: 64
  heads: 8
  attn_dropout: 0
  ff_dropout: 0
  flash_attn: True
  dim_freqs_in: 1025
  sample_rate: 44100
  stft_n_fft: 2048
  stft_hop_length: 441
  stft_win_length: 2048
  stft_normalized: False
  mask_estimator_depth: 2
  multi_stft_resolution_loss_weight: 1.0
  multi_stft_resolutions_window_sizes: !!python/tuple [4096, 2048, 1024, 512, 256]
  multi_stft_hop_size: 147
  multi_stft_normalized: False
training: {instruments: [vocals, other], target_instrument: vocals}
inference: {batch_size: 4, dim_t: 256, num_overlap: 2}
"""

EP317_BANDS = [2] * 24 + [4] * 12 + [12] * 8 + [24] * 8 + [48] * 8 + [128, 129]
EP317 = f"""\
audio: {{chunk_size: 352800, dim_f: 1024, dim_t: 801, hop_length: 441, n_fft: 2048,
        num_channels: 2, sample_rate: 44100, min_mean_abs: 0.0}}
model:
  dim: 512
  depth: 12
  stereo: true
  num_stems: 1
  time_transformer_depth: 1
  freq_transformer_depth: 1
  linear_transformer_depth: 0
  freqs_per_bands: !!python/tuple {EP317_BANDS}
  dim_head: 64
  heads: 8
  attn_dropout: 0.1
  ff_dropout: 0.1
  flash_attn: true
  dim_freqs_in: 1025
  stft_n_fft: 2048
  stft_hop_length: 441
  stft_win_length: 2048
  stft_normalized: false
  mask_estimator_depth: 2
  multi_stft_resolution_loss_weight: 1.0
  multi_stft_resolutions_window_sizes: !!python/tuple [4096, 2048, 1024, 512, 256]
  multi_stft_hop_size: 147
  multi_stft_normalized: False
training: {{instruments: [vocals, other], target_instrument: vocals}}
inference: {{batch_size: 4, dim_t: 801, num_overlap: 2}}
"""

MODELS = {"kim": ("mel_band_roformer_kim_size", KIM), "ep317": ("bs_roformer_ep317_size", EP317)}


def write_random_model(folder: Path, key: str):
    """``<name>.yaml`` (the published config) + ``<name>.ckpt`` (random weights, seed 0) of
    ``MODELS[key]`` in ``folder``; returns (name, config)."""
    import torch

    from imaker import roformer
    from imaker.roformer.net import RoformerNet

    name, text = MODELS[key]
    (folder / f"{name}.yaml").write_text(text)
    config = roformer.read_config(folder / f"{name}.yaml")
    torch.manual_seed(0)
    net = RoformerNet(config.architecture, **config.model)
    torch.save(net.state_dict(), folder / f"{name}.ckpt")
    return name, config


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The bf16/AMX/AVX-512 flags of this CPU (what decides the bf16 speed)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f",
                                                              "avx512_fp16", "avx2"))]
                    return " ".join(keep) or "none of amx/avx512/avx2"
    except OSError:
        pass
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*MODELS, "all"], default="kim")
    ap.add_argument("--seconds", type=float, default=None,
                    help="input length (default: two windows' length, one window for ep317)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--openvino", action="store_true", help="also ours with the OpenVINO core")
    ap.add_argument("--bf16", action="store_true",
                    help="also ours with the network core under bf16 autocast (not the fp32 path)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    import torch

    from imaker import roformer
    from test_roformer import music, snr_db

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores ({cpu_flags()}), torch "
          f"{torch.__version__}, threads {args.threads}, load average {load:.1f}")
    results = []
    names = list(MODELS) if args.model == "all" else [args.model]
    for key in names:
        with tempfile.TemporaryDirectory(prefix="bench-roformer-") as tmp:
            folder = Path(tmp)
            name, config = write_random_model(folder, key)
            checks = {k: {} for k in ("vr_download_list", "mdx_download_list",
                                      "mdx_download_vip_list", "demucs_download_list",
                                      "mdx23c_download_list", "mdx23c_download_vip_list")}
            checks["roformer_download_list"] = {name: {f"{name}.ckpt": f"{name}.yaml"}}
            (folder / "download_checks.json").write_text(json.dumps(checks))

            seconds = args.seconds or (config.chunk_size / config.samplerate
                                       * (1 if key == "ep317" else 2))
            wav = music(seconds, seed=7)
            ours = roformer.load(folder / f"{name}.ckpt", folder / f"{name}.yaml")
            params = ours.parameters
            from audio_separator.separator import Separator

            sep = Separator(log_level=logging.ERROR, model_file_dir=str(folder),
                            output_dir=str(folder))
            sep.load_model(f"{name}.ckpt")
            ref_model = sep.model_instance
            ov = None
            if args.openvino:
                from imaker.roformer import ov_backend

                ov = ov_backend.runner(ours, threads=args.threads)
                print(f"{name}: OpenVINO conversion + compile {ov.convert_seconds:.1f} s")
            times: dict[str, list[float]] = {"ours": [], "reference": [], "ours_openvino": [],
                                             "ours_bf16": []}
            cpu: dict[str, list[float]] = {k: [] for k in times}

            def timed(what: str, fn) -> None:
                t, c = time.perf_counter(), time.process_time()
                outs[what] = fn()
                cpu[what].append(time.process_time() - c)
                times[what].append(time.perf_counter() - t)

            outs: dict[str, dict] = {}
            for _ in range(args.repeat):
                # alternating runs: ours, reference[, OpenVINO][, bf16]
                timed("ours", lambda: ours.separate(wav))
                timed("reference", lambda: ref_model.demix(wav.copy()))
                if ov is not None:
                    timed("ours_openvino", lambda: ours.separate(wav, runner=ov))
                if args.bf16:
                    timed("ours_bf16", lambda: ours.separate(wav, autocast="bf16"))
            row = {"model": name, "architecture": config.architecture, "parameters": params,
                   "seconds": round(seconds, 2), "chunk_size": config.chunk_size,
                   "num_overlap": config.num_overlap, "threads": args.threads,
                   "cpu": cpu_name(), "load_average_start": round(load, 1),
                   "load_average_end": round(os.getloadavg()[0], 1),
                   "runs_s": {k: [round(t, 2) for t in v] for k, v in times.items() if v},
                   "runs_cpu_s": {k: [round(t, 2) for t in v] for k, v in cpu.items() if v}}
            ref_best = min(times["reference"])
            ref_cpu = min(cpu["reference"])
            for what, ts in times.items():
                if not ts:
                    continue
                best = min(ts)
                row[f"{what}_s_per_audio_s"] = round(best / seconds, 3)
                row[f"{what}_speedup_vs_reference"] = round(ref_best / best, 2)
                row[f"{what}_cpu_s_per_audio_s"] = round(min(cpu[what]) / seconds, 3)
                row[f"{what}_cpu_speedup_vs_reference"] = round(ref_cpu / min(cpu[what]), 2)
                if what != "reference":
                    row[f"{what}_snr_db"] = {
                        s: round(snr_db(outs["reference"][s], outs[what][s]), 1)
                        for s in ours.sources}
            results.append(row)
            print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
