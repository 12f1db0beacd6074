"""Measurements users look at and checks they rely on (no Dagster): loudness (EBU R128),
peaks, RMS, waveform pictures, and per-track output checks."""

from __future__ import annotations

import base64
import re
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import audio as audio_mod
from .bundle import BundleError, read_manifest, schema_errors
from .fsutil import sha256_file

DURATION_TOLERANCE_S = 0.050
SILENCE_FLOOR_DBFS = -60.0


loudness = audio_mod.loudness  # measured where the files are encoded and tagged


def _db(x: float) -> float:
    return round(20 * np.log10(x), 2) if x > 0 else float("-inf")


def levels(wav: np.ndarray) -> dict:
    """Sample peak and RMS in dBFS."""
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    rms = float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0
    return {"peak_dbfs": _db(peak), "rms_dbfs": _db(rms)}


def waveform_png(path: Path, *, width: int = 800, height: int = 120, color: str = "0x2f6fdf") -> bytes:
    """A waveform picture of the file, rendered by ffmpeg's showwavespic."""
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-filter_complex",
         f"[0:a:0]aformat=channel_layouts=mono,showwavespic=s={width}x{height}:colors={color}[v]",
         "-map", "[v]", "-frames:v", "1", "-f", "image2", "-c:v", "png", "pipe:1"], capture_output=True)
    if proc.returncode != 0 or not proc.stdout.startswith(b"\x89PNG"):
        raise audio_mod.AudioError(f"cannot draw the waveform of {Path(path).name}")
    return proc.stdout


def markdown_images(pictures: dict[str, bytes]) -> str:
    """Markdown with inline PNGs (the Dagster UI renders markdown metadata, images included)."""
    return "\n\n".join(f"**{title}**\n\n![{title}](data:image/png;base64,"
                       f"{base64.b64encode(png).decode()})" for title, png in pictures.items())


@lru_cache(maxsize=32)
def file_levels(path: str, mtime_ns: int, size: int) -> dict:
    """``levels`` of a file, decoded once per content version (the clipping and silence
    checks of a track run in one process and share the decode). Streamed: peak and sum of
    squares are taken chunk by chunk, so memory does not grow with the track's length."""
    info = audio_mod.probe(Path(path))
    peak, squares, count = 0.0, 0.0, 0
    for chunk in audio_mod.iter_decode(Path(path), info["audio"]["sample_rate"],
                                       info["audio"]["channels"]):
        peak = max(peak, float(np.max(np.abs(chunk))))
        flat = chunk.ravel().astype(np.float64)
        squares += float(np.dot(flat, flat))
        count += flat.size
    rms = float(np.sqrt(squares / count)) if count else 0.0
    return {"peak_dbfs": _db(peak), "rms_dbfs": _db(rms)}


# ----- checks --------------------------------------------------------------------------
@dataclass
class CheckOutcome:
    passed: bool
    description: str
    details: dict = field(default_factory=dict)


def _audio(artifacts: list[dict]) -> list[dict]:
    return [a for a in artifacts if a.get("kind") == "audio"]


def check_durations(output_dir: Path, artifacts: list[dict], source_duration_s: float,
                    tolerance_s: float = DURATION_TOLERANCE_S) -> CheckOutcome:
    """Every audio variant lasts as long as the source (± 50 ms), measured with ffprobe."""
    off = {}
    measured = {}
    for art in _audio(artifacts):
        info = audio_mod.probe(Path(output_dir) / art["path"])
        measured[art["variant"]] = info["duration_s"]
        if info["duration_s"] is None or abs(info["duration_s"] - source_duration_s) > tolerance_s:
            off[art["variant"]] = info["duration_s"]
    text = (f"all variants within {tolerance_s * 1000:.0f} ms of the source ({source_duration_s:.3f} s)"
            if not off else f"variants off the source duration {source_duration_s:.3f} s: {off}")
    return CheckOutcome(not off, text, {"source_s": source_duration_s, "variants_s": measured})


def check_levels(output_dir: Path, artifacts: list[dict], *, floor_dbfs: float = SILENCE_FLOOR_DBFS
                 ) -> tuple[CheckOutcome, CheckOutcome]:
    """(no clipping: sample peak <= 0 dBFS, not silent: RMS above the floor) for every variant."""
    clipped, silent, per = {}, {}, {}
    for art in _audio(artifacts):
        path = Path(output_dir) / art["path"]
        st = path.stat()
        lv = file_levels(str(path), st.st_mtime_ns, st.st_size)
        per[art["variant"]] = lv
        if lv["peak_dbfs"] > 0.0:
            clipped[art["variant"]] = lv["peak_dbfs"]
        if lv["rms_dbfs"] <= floor_dbfs:
            silent[art["variant"]] = lv["rms_dbfs"]
    no_clip = CheckOutcome(not clipped, "no variant peaks above 0 dBFS" if not clipped
                           else f"clipping (peak dBFS): {clipped}", {"levels": per})
    not_silent = CheckOutcome(not silent, f"every variant's RMS is above {floor_dbfs} dBFS"
                              if not silent else f"silent variants (RMS dBFS): {silent}",
                              {"levels": per})
    return no_clip, not_silent


def check_manifest(output_dir: Path) -> CheckOutcome:
    """manifest.json validates against its schema and every listed file exists with the
    listed size and sha256."""
    try:
        manifest = read_manifest(output_dir)
    except BundleError as exc:
        return CheckOutcome(False, f"manifest.json unreadable: {exc}")
    errors = schema_errors("manifest", manifest)
    if errors:
        return CheckOutcome(False, "manifest does not match its schema: " + "; ".join(errors[:3]))
    problems = []
    for art in manifest["artifacts"]:
        file = Path(output_dir) / art["path"]
        if not file.is_file():
            problems.append(f"{art['path']}: missing")
        elif file.stat().st_size != art["size_bytes"] or sha256_file(file) != art["sha256"]:
            problems.append(f"{art['path']}: sha256/size differs from the manifest")
    if problems:
        return CheckOutcome(False, "; ".join(problems), {"problems": problems})
    return CheckOutcome(True, f"schema valid; {len(manifest['artifacts'])} files match their sha256")
