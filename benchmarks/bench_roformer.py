"""RoFormer separation speed on this CPU: ours (imaker.roformer, torch fp32; optionally
OpenVINO) against the reference implementation (audio-separator 0.47.1's MDXC path, the
test extra), at the published sizes with random weights, plus the SNR between them; and,
with ``--tracks N``, the throughput over N tracks on the CPU or a GPU (below).

    .venv/bin/python benchmarks/bench_roformer.py [--model kim|ep317|all] [--seconds S]
        [--threads N] [--repeat R] [--openvino] [--bf16] [--size published|tiny]
    .venv/bin/python benchmarks/bench_roformer.py --tracks N [--device cpu|cuda]
        [--seconds S] [--model ...] [--size published|tiny] [--precision default,fp32]
        [--song-dir DIR] [--no-reference] [--threads N] [--json out.json]

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

Throughput mode (``--tracks N``; issue 21's GPU goal: >= 3x the reference's throughput over
8 tracks, batching across tracks; ``benchmarks/gpu.sh`` step 6 runs it on CUDA with 8 x 60 s
at the published sizes). N different inputs of ``--seconds`` each (default 60): the first
seconds of the generated songs in ``--song-dir`` (``render_songs.py``; rendered there when
missing, not timed), else the tests' ``music()`` signal with one seed per track. On
``--device`` (the reference is kept there too; it puts itself on CUDA whenever torch sees a
GPU):
* the reference: audio-separator's ``MDXCSeparator.demix`` on each track in turn, as its
  users run it (one file after another), with its own defaults (``use_autocast=False``,
  ``use_native_fp16=False``, ``use_torch_compile=False``: fp32 eager; ``effective_precision``
  is recorded);
* ours: the N tracks at once, each through the separation service's own path
  (``service._Separator.separate``: the settings' precision, ``RoformerModel.separate`` with
  the model's ``WindowBatcher`` from ``Service.batcher_for``), so the windows of the tracks
  share forward passes; on CUDA as the service runs it (after a warm-up call that measures a
  pass, ``Service._readmit``: as many tracks at once and windows per pass as the memory
  admission allows), on the CPU forced with ``cross_batch=True`` (the service splits the
  cores there instead; a dry run of the CUDA path, not the CPU figure). Precisions
  (``--precision``): ``default`` = the settings' defaults (``DEMUCS_AUTOCAST=true``: bf16 on
  CUDA; on the CPU ``DEMUCS_CPU_AUTOCAST=auto``: bf16 only with AMX-BF16), ``bf16``, ``fp32``;
  one that resolves to a precision already run is not run again.
Both sides get one warm-up call (one call's windows of the first track) before the clock
starts; CUDA is synchronized before the clocks are read. Printed per model: audio-seconds
per wall-second of each, ours / reference (goal >= 3), the separations at once and windows
per pass, peak GPU memory (``torch.cuda.max_memory_allocated``; the batcher resets the
counter at each pass, so it is read after every pass too; the reference model is freed
before ours is loaded) and the SNR of ours against the reference per stem on every track
(>= 40 dB expected; fp32 far above). ``--json`` is rewritten after each model, so a run cut
short keeps the models done. ``--size tiny``: the tests' tiny configs, to check the mode on
a CPU in seconds (``--tracks 2 --seconds 6 --size tiny``); the CPU is shared here, and the
reference's many small operations suffer most from a descheduled OpenMP thread, so CPU
ratios swing widely with ``--threads 2`` (read them as a dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

#: the published configs, verbatim (tests/data/roformer/SOURCE.md: ZFTurbo's files at a
#: fixed commit, the ones `imaker models fetch` downloads and checks by sha256)
RELEASED = Path(__file__).resolve().parents[1] / "tests" / "data" / "roformer"
MODELS = {
    "kim": ("mel_band_roformer_kim_size",
            (RELEASED / "config_vocals_mel_band_roformer_kj.yaml").read_text()),
    "ep317": ("bs_roformer_ep317_size",
              (RELEASED / "model_bs_roformer_ep_317_sdr_12.9755.yaml").read_text()),
}


def tiny_models() -> dict[str, tuple[str, str]]:
    """The tiny configs of tests/test_roformer.py (same architectures, dim 16, depth 1,
    windows of 2 s), for a quick dry run of this benchmark on a CPU (``--size tiny``)."""
    from test_roformer import bs_yaml, mel_yaml

    return {"kim": ("tiny_mel_band_roformer", mel_yaml()), "ep317": ("tiny_bs_roformer", bs_yaml())}


def write_random_model(folder: Path, key: str, size: str = "published"):
    """``<name>.yaml`` (the published config, or the tests' tiny one for ``size="tiny"``) +
    ``<name>.ckpt`` (random weights, seed 0) of ``MODELS[key]`` in ``folder``; returns
    (name, config)."""
    import torch

    from imaker import roformer
    from imaker.roformer.net import RoformerNet

    name, text = (tiny_models() if size == "tiny" else MODELS)[key]
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


def seed_reference_folder(folder: Path, name: str) -> None:
    """audio-separator's offline seed: the model list its ``load_model`` would fetch
    (``download_checks.json``), naming our ``<name>.ckpt`` + ``<name>.yaml``."""
    checks = {k: {} for k in ("vr_download_list", "mdx_download_list",
                              "mdx_download_vip_list", "demucs_download_list",
                              "mdx23c_download_list", "mdx23c_download_vip_list")}
    checks["roformer_download_list"] = {name: {f"{name}.ckpt": f"{name}.yaml"}}
    (folder / "download_checks.json").write_text(json.dumps(checks))


def reference_model(folder: Path, name: str, device: str = "cpu"):
    """audio-separator's loaded ``MDXCSeparator`` for ``<name>.ckpt`` in ``folder`` (seeded
    by ``seed_reference_folder``), with its own defaults (``use_autocast=False``,
    ``use_native_fp16=False``, ``use_torch_compile=False``: fp32 eager). It puts itself on
    CUDA whenever torch sees a GPU; ``device="cpu"`` keeps it on the CPU there."""
    from unittest import mock

    import torch
    from audio_separator.separator import Separator

    hide = (mock.patch.object(torch.cuda, "is_available", return_value=False)
            if not str(device).startswith("cuda") else contextlib.nullcontext())
    with hide:
        sep = Separator(log_level=logging.ERROR, model_file_dir=str(folder),
                        output_dir=str(folder))
        sep.load_model(f"{name}.ckpt")
    return sep.model_instance


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
    ap.add_argument("--size", choices=["published", "tiny"], default="published",
                    help="the published configs (default) or the tests' tiny ones (a dry run)")
    ap.add_argument("--tracks", type=int, default=0,
                    help="throughput mode: N different tracks of --seconds each (see above)")
    ap.add_argument("--device", default="cpu", help="throughput mode: cpu or cuda[:N]")
    ap.add_argument("--precision", default="default,fp32",
                    help="throughput mode: ours with these precisions, comma-separated: "
                         "default (the settings' defaults: bf16 on CUDA), bf16, fp32")
    ap.add_argument("--song-dir", type=Path, default=None,
                    help="throughput mode: the generated songs there (render_songs.py's "
                         "layout; rendered where missing), cut to --seconds; default: the "
                         "tests' music() signal, one seed per track")
    ap.add_argument("--no-reference", action="store_true",
                    help="throughput mode: ours only (where audio-separator is not installed)")
    args = ap.parse_args()
    if args.tracks:
        return throughput(args)
    if args.device != "cpu":
        ap.error("--device applies to the throughput mode (--tracks N) only")

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
            name, config = write_random_model(folder, key, args.size)
            seed_reference_folder(folder, name)

            seconds = args.seconds or (config.chunk_size / config.samplerate
                                       * (1 if key == "ep317" else 2))
            wav = music(seconds, seed=7)
            ours = roformer.load(folder / f"{name}.ckpt", folder / f"{name}.yaml")
            params = ours.parameters
            ref_model = reference_model(folder, name, "cpu")
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


#: ours' precisions in the throughput mode: the ``separation`` settings each one runs with
#: (``default``: the settings' defaults, i.e. ``DEMUCS_AUTOCAST=true`` -> bf16 on CUDA and
#: ``DEMUCS_CPU_AUTOCAST=auto`` on the CPU, fp32 without AMX-BF16)
PRECISIONS = {"default": {}, "bf16": {"autocast": True, "cpu_autocast": True},
              "fp32": {"autocast": False, "cpu_autocast": False}}


def load_tracks(count: int, seconds: float, samplerate: int, song_dir: Path | None):
    """``count`` different stereo float32 ``(2, n)`` inputs of ``seconds`` each, and what they
    are: the mixtures of the generated songs in ``song_dir`` (``render_songs.py``'s layout;
    songs at least that long are cut, else ``count`` songs of that length are rendered into
    ``song_dir/roformer-<seconds>s``, not timed), or the tests' ``music()`` signal with one
    seed per track."""
    import numpy as np

    n = int(round(seconds * samplerate))
    if song_dir is None:
        from test_roformer import music

        return ([music(seconds, seed=100 + i) for i in range(count)],
                f"music() test signal, seeds 100..{99 + count}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from imaker import devsong

    def usable(folder: Path) -> bool:
        try:
            info = json.loads((folder / "song.json").read_text())
        except (OSError, ValueError):
            return False
        return (float(info.get("seconds", 0)) >= seconds
                and info.get("generator_version") == devsong.GENERATOR_VERSION
                and (folder / "mixture.wav").is_file())

    folders = [song_dir / devsong.song_name(s) for s in range(count)]
    if not all(usable(f) for f in folders):
        from render_songs import songs, use_bundled_fluidsynth

        use_bundled_fluidsynth()
        try:
            folders = songs(song_dir / f"roformer-{seconds:g}s", count, seconds)
        except Exception as exc:  # noqa: BLE001 - no FluidSynth here: the test signal
            print(f"no generated songs ({type(exc).__name__}: {exc}); the test signal instead")
            return load_tracks(count, seconds, samplerate, None)
    wavs = []
    for folder in folders:
        audio, rate = devsong.read_wav(folder / "mixture.wav")
        if rate != samplerate:
            raise SystemExit(f"{folder}: {rate} Hz, the model wants {samplerate} Hz")
        wavs.append(np.ascontiguousarray(audio[:n].T, dtype=np.float32))
    return wavs, f"generated songs {folders[0].parent}/{folders[0].name}.. (first {seconds:g} s)"


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 2)


def _reference_run(folder: Path, name: str, device: str, wavs, warm, audio_s: float,
                   row: dict) -> list[dict]:
    """audio-separator's MDXC ``demix`` on each track in turn (after one warm-up call), as
    its users run it: one file after another; fills ``row["reference"]``, returns the
    outputs (float32, on the host)."""
    import numpy as np
    import torch

    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    ref = reference_model(folder, name, device)
    ref_precision = getattr(ref, "effective_precision", "fp32")
    ref.demix(warm.copy())
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    ref_out = []
    for w in wavs:
        out = ref.demix(w.copy())
        ref_out.append({k: np.asarray(v, dtype=np.float32) for k, v in out.items()})
    sync()
    wall = time.perf_counter() - t
    row["reference"] = {
        "what": "audio-separator 0.47.1 MDXCSeparator.demix, one track after another",
        "precision": ref_precision, "wall_s": round(wall, 3),
        "audio_s_per_s": round(audio_s / wall, 2),
        "peak_gpu_gib": _gib(torch.cuda.max_memory_allocated(device)) if cuda else None}
    print(f"{name}: reference ({ref_precision}) {wall:.2f} s = "
          f"{audio_s / wall:.2f} audio-s/s", flush=True)
    del ref
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return ref_out


def throughput(args) -> int:
    """The throughput mode (``--tracks N``): see the module docstring."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's per-window progress bar
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    from imaker import roformer
    from imaker.separator.service import SeparateRequest, Service, _Separator
    from imaker.settings import Separation
    from test_roformer import snr_db

    device = args.device
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if not cuda and device != "cpu":
        raise SystemExit(f"--device {device}: expected cpu or cuda[:N]")
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise SystemExit(f"--precision: expected some of {', '.join(PRECISIONS)}, got {unknown}")
    seconds = args.seconds or 60.0
    torch.set_num_threads(args.threads)
    if cuda:
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        where = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA "
                 f"{torch.version.cuda}), CPU: {os.cpu_count()} cores")
    else:
        where = (f"cpu: {cpu_name()}, {os.cpu_count()} cores ({cpu_flags()}), torch "
                 f"{torch.__version__}, threads {args.threads}, load average "
                 f"{os.getloadavg()[0]:.1f}")
    print(where, flush=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    wavs, inputs = load_tracks(args.tracks, seconds, 44100, args.song_dir)
    audio_s = args.tracks * seconds
    print(f"inputs: {args.tracks} x {seconds:g} s ({inputs})", flush=True)
    results = []
    names = list(MODELS) if args.model == "all" else [args.model]
    for key in names:
        with tempfile.TemporaryDirectory(prefix="bench-roformer-") as tmp:
            folder = Path(tmp)
            t0 = time.perf_counter()
            name, config = write_random_model(folder, key, args.size)
            seed_reference_folder(folder, name)
            chunk, step = config.chunk_size, config.chunk_size // config.num_overlap
            batch = config.batch_size if cuda else 1  # ours' windows per call (separate())
            # the warm-up (not timed): one call's windows of the first track, both sides
            warm = np.ascontiguousarray(wavs[0][:, :chunk + (batch - 1) * step])
            row = {"model": name, "architecture": config.architecture, "size": args.size,
                   "device": where, "tracks": args.tracks, "seconds": seconds,
                   "audio_seconds": audio_s, "inputs": inputs, "chunk_size": chunk,
                   "num_overlap": config.num_overlap, "windows_per_call": batch,
                   "windows": sum(len(roformer.window_starts(w.shape[1], chunk, step))
                                  for w in wavs)}
            print(f"{name}: random weights written in {time.perf_counter() - t0:.1f} s "
                  f"({row['windows']} windows of {chunk / 44100:.2f} s in all)", flush=True)

            # the reference: audio-separator's MDXC demix on each track in turn, its defaults
            ref_out = None
            row["reference"] = None
            if not args.no_reference:
                ref_out = _reference_run(folder, name, device, wavs, warm, audio_s, row)

            # ours: the tracks at once through the service's separation path and its
            # shared WindowBatcher per model (Service.batcher_for: on CUDA as it is, on the
            # CPU forced with cross_batch=True, which the service does not do there)
            model = roformer.load(folder / f"{name}.ckpt", folder / f"{name}.yaml", device)
            row["parameters"] = model.parameters
            row["ours"] = {}
            for label in precisions:
                settings = Separation(**PRECISIONS[label])
                service = Service(concurrency=None if cuda else args.tracks,
                                  cross_batch=not cuda)
                service.cores = args.threads  # the CPU threads a separation takes (alone)
                req = SeparateRequest(job_id="bench", source="/bench", stems_dir="/bench",
                                      separation=settings)
                precision = _Separator(service, req, threading.Event()).precision(model)
                same = next((k for k, v in row["ours"].items() if v["precision"] == precision),
                            None)
                if same is not None:
                    row["ours"][label] = {"precision": precision, "same_as": same}
                    print(f"{name}: ours {label} = {precision}, as {same} (not run again)")
                    continue
                batcher = service.batcher_for(model)
                peak = [0]
                if cuda:
                    # the batcher resets the peak counter at each pass (its admission
                    # measure): read it after each pass too
                    measured = batcher._measured

                    def _measured(dev, windows, forward, _measured=measured, _peak=peak):
                        res = _measured(dev, windows, forward)
                        _peak[0] = max(_peak[0], torch.cuda.max_memory_allocated(dev))
                        return res

                    batcher._measured = _measured
                _Separator(service, req, threading.Event()).separate(model, warm)
                sync()
                try:
                    service._readmit()  # CUDA: admit by the measured pass, as the service does
                except Exception as exc:  # noqa: BLE001 - report it, keep the figure
                    print(f"{name}: admission not applied ({type(exc).__name__}: {exc})")
                passes, merged = batcher.passes, batcher.merged
                weights = torch.cuda.memory_allocated(device) if cuda else None
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    peak[0] = 0
                gate = threading.BoundedSemaphore(service.concurrency)  # the service's limiter
                start = threading.Barrier(args.tracks + 1)
                outs: list = [None] * args.tracks
                errors: list = []

                def work(i: int, service=service, req=req, gate=gate, start=start,
                         outs=outs, errors=errors) -> None:
                    start.wait()
                    try:
                        with gate:
                            outs[i] = _Separator(service, req, threading.Event()).separate(
                                model, wavs[i])
                    except BaseException as exc:  # noqa: BLE001 - raised below
                        errors.append(exc)

                workers = [threading.Thread(target=work, args=(i,)) for i in range(args.tracks)]
                for w in workers:
                    w.start()
                start.wait()
                t = time.perf_counter()
                for w in workers:
                    w.join()
                sync()
                wall = time.perf_counter() - t
                if errors:
                    raise errors[0]
                snr = ({s: [round(snr_db(ref_out[i][s], outs[i][s]), 1)
                            for i in range(args.tracks)] for s in model.sources}
                       if ref_out is not None else None)
                ratio = (row["reference"]["wall_s"] / wall) if ref_out is not None else None
                if cuda:
                    peak[0] = max(peak[0], torch.cuda.max_memory_allocated(device))
                row["ours"][label] = {
                    "precision": precision, "wall_s": round(wall, 3),
                    "audio_s_per_s": round(audio_s / wall, 2),
                    "ratio_vs_reference": None if ratio is None else round(ratio, 2),
                    "separations_at_once": service.concurrency,
                    "windows_per_pass": batcher.max_items,
                    "passes": batcher.passes - passes, "shared_passes": batcher.merged - merged,
                    "gpu_admission": service.gpu,
                    "weights_gpu_gib": _gib(weights),
                    "peak_gpu_gib": _gib(peak[0]) if cuda else None,
                    "snr_db": snr,
                    "snr_min_db": None if snr is None else {s: min(v) for s, v in snr.items()}}
                mem = (f", peak GPU memory {peak[0] / 2**30:.2f} GiB (weights "
                       f"{weights / 2**30:.2f})" if cuda else "")
                vs = ("no reference run" if ratio is None else
                      f"{ratio:.2f}x the reference (goal >= 3); SNR vs reference, worst track: "
                      + ", ".join(f"{s} {min(v):.1f} dB" for s, v in snr.items()))
                print(f"{name}: ours ({precision}, {service.concurrency} at once, passes of "
                      f"<= {batcher.max_items} windows: {batcher.passes - passes} passes, "
                      f"{batcher.merged - merged} shared) {wall:.2f} s = {audio_s / wall:.2f} "
                      f"audio-s/s = {vs}{mem}", flush=True)
                del outs
            del model, ref_out
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after each model: a run cut short keeps the models done
            args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
