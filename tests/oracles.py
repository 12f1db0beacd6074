"""Whole-track reference implementations the tests compare the product's streaming code
with (moved out of the product modules, which stream and never hold a track whole)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from imaker import audio as audio_mod
from imaker.pipeline import Library
from imaker.variants import VariantSpec, gain_for


def levels(wav: np.ndarray) -> dict:
    """Sample peak and RMS in dBFS of a whole track (the product measures in chunks:
    ``audio.peak_rms``, ``audio.Encoder``)."""
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    return {"peak_dbfs": audio_mod.dbfs(peak), "rms_dbfs": audio_mod.dbfs(rms)}


def codec_name(fmt: str) -> str:
    """The codec ffprobe reports for a file encoded in ``fmt`` (the manifest's codec)."""
    return audio_mod.FORMATS[fmt][2]


def load_stems(lib: Library, job_id: str) -> tuple[dict[str, np.ndarray], dict]:
    """A track's stored stems decoded whole: each stem the weighted sum of its stored files
    divided by their scale (``imaker.stemset.terms`` of ``stems.json``)."""
    from imaker import stemset

    meta = lib.read_json(job_id, "stems.json", stems=True)
    stems = {}
    for name, parts in stemset.terms(lib.stem_dir(job_id), meta).items():
        out = None
        for t in parts:
            wav = audio_mod.decode(t.path, meta["sample_rate"], meta["channels"]) / t.scale
            wav = wav if t.weight == 1.0 else np.float32(t.weight) * wav
            out = wav if out is None else out + wav
        stems[name] = out
    return stems, meta


def mix(stems: dict[str, np.ndarray], spec: VariantSpec) -> tuple[np.ndarray, float]:
    """Sum the variant's stems of a whole track and apply the anti-clipping rule (what
    ``variants.stream_mix`` does chunk by chunk). Returns (audio, gain)."""
    names = spec.stems_for(list(stems))
    out = np.zeros_like(stems[names[0]], dtype=np.float32)
    for name in names:
        out += stems[name]
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    gain = gain_for(peak)
    if gain != 1.0:
        out *= gain
    return out, gain


def loudness(path: Path) -> dict:
    """Integrated loudness (LUFS), loudness range (LU) and true peak (dBTP) of a file by a
    decode of its own with ffmpeg's ebur128 filter (the pipeline measures while encoding,
    ``audio.Encoder(measure=True)``: this is the independent measurement tests compare
    with)."""
    proc = subprocess.run(
        [audio_mod.tool_path("ffmpeg"), "-nostdin", "-hide_banner", "-nostats", "-i", str(path),
         "-map", "0:a:0", "-af", "ebur128=peak=true:framelog=verbose", "-f", "null", "-"],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise audio_mod.AudioError(f"cannot measure loudness of {path}")
    return audio_mod.parse_ebur128(proc.stderr)
