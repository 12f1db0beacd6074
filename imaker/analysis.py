"""Measurements users look at and checks they rely on (no Dagster): loudness (EBU R128),
peaks, RMS, waveform pictures, and per-track output checks."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import audio as audio_mod
from .bundle import BundleError, read_manifest, schema_errors
from .fsutil import sha256_file

DURATION_TOLERANCE_S = 0.050
SILENCE_FLOOR_DBFS = -60.0




def waveform_png(path: Path, *, color: str = "0x2f6fdf") -> bytes:
    """A waveform picture of a file, rendered by ffmpeg's showwavespic (a decode of its own:
    the pipeline draws its pictures while encoding, ``audio.Encoder(waveform=...)``; this is
    for files stored before it did)."""
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-filter_complex",
         f"[0:a:0]{audio_mod.waveform_filter(color)}[v]",
         "-map", "[v]", "-frames:v", "1", "-f", "image2", "-c:v", "png", "pipe:1"], capture_output=True)
    if proc.returncode != 0 or not proc.stdout.startswith(b"\x89PNG"):
        raise audio_mod.AudioError(f"cannot draw the waveform of {Path(path).name}")
    return proc.stdout


def markdown_images(pictures: dict[str, bytes]) -> str:
    """Markdown with inline PNGs (the Dagster UI renders markdown metadata, images included)."""
    return "\n\n".join(f"**{title}**\n\n![{title}](data:image/png;base64,"
                       f"{base64.b64encode(png).decode()})" for title, png in pictures.items())


def measure_file(path: Path, samplerate: int, channels: int) -> dict:
    """One read of a file: a single ffmpeg decodes it at ``samplerate``/``channels`` (known
    from its record: no ffprobe) and its duration (decoded frames / rate), sample peak and
    RMS are taken chunk by chunk, so memory does not grow with the track's length."""
    levels, frames = audio_mod.Levels(), 0
    for chunk in audio_mod.iter_decode(Path(path), samplerate, channels):
        levels.add(chunk)
        frames += chunk.shape[1]
    return {"duration_s": round(frames / samplerate, 4), "peak_dbfs": audio_mod.dbfs(levels.peak),
            "rms_dbfs": audio_mod.dbfs(levels.rms)}


# ----- checks --------------------------------------------------------------------------
@dataclass
class CheckOutcome:
    passed: bool
    description: str
    details: dict = field(default_factory=dict)
    #: of a failed check: "error" (a blocking check stops the track) or "warn" (shown,
    #: the track goes on)
    severity: str = "error"


def _audio(artifacts: list[dict]) -> list[dict]:
    return [a for a in artifacts if a.get("kind") == "audio"]


#: the checks of the published variants, all from one decode of each file (``check_variants``)
VARIANT_CHECKS = ("duration", "clipping", "silence")


def check_variants(output_dir: Path, artifacts: list[dict], source_duration_s: float, *,
                   samplerate: int = 44100, channels: int = 2,
                   tolerance_s: float = DURATION_TOLERANCE_S,
                   floor_dbfs: float = SILENCE_FLOOR_DBFS) -> dict[str, CheckOutcome]:
    """The checks of the published audio variants, ``{"duration", "clipping", "silence"}``:
    every variant lasts as long as the source (± 50 ms), none clips, none is silent (RMS
    above the floor). Each file is read once: one ffmpeg decodes it (``measure_file``) at
    the rate and channel count of its record (``samplerate`` and ``channels`` for a record
    without them). A file that cannot be decoded fails all three, saying why.

    Clipping: the published file itself is measured (its decoded sample peak), beside the
    peak of the PCM the encoder was sent (``peak_dbfs`` of the record, measured while
    encoding). A variant clips (error) when the PCM sent went above 0 dBFS, or when its
    decode does and the record has no PCM peak. A decode above 0 dBFS from PCM that stayed
    under it is a lossy codec's overshoot (AAC, most at sharp attacks: +2.2 dB was seen
    from a mix at -1.4 dBFS): the mix did not clip and the file plays as encoded in players
    that decode to float, so it is a warning (the track is published), not an error; a
    player that decodes to 16-bit integers clips those samples."""
    measured, broken, sent = {}, {}, {}
    for art in _audio(artifacts):
        path = Path(output_dir) / art["path"]
        if art.get("peak_dbfs") is not None:
            sent[art["variant"]] = float(art["peak_dbfs"])
        try:
            measured[art["variant"]] = measure_file(
                path, int(art.get("sample_rate") or samplerate), int(art.get("channels") or channels))
        except (audio_mod.AudioError, OSError) as exc:
            broken[art["variant"]] = str(exc)
    durations = {v: m["duration_s"] for v, m in measured.items()}
    per = {v: {"peak_dbfs": m["peak_dbfs"], "rms_dbfs": m["rms_dbfs"]} for v, m in measured.items()}
    off = {v: d for v, d in durations.items() if abs(d - source_duration_s) > tolerance_s}
    decoded = {v: lv["peak_dbfs"] for v, lv in per.items()}
    # what decides: the PCM's peak where it was measured while encoding, else the decode's
    clipped = {v: max(p, sent.get(v, p)) for v, p in decoded.items() if sent.get(v, p) > 0.0}
    overshoot = {v: p for v, p in decoded.items() if p > 0.0 and v not in clipped}
    silent = {v: lv["rms_dbfs"] for v, lv in per.items() if lv["rms_dbfs"] <= floor_dbfs}
    def outcome(bad: dict, good: str, bad_text: str, details: dict) -> CheckOutcome:
        if broken:
            details = {**details, "unreadable": broken}
        if not bad and not broken:
            return CheckOutcome(True, good, details)
        parts = ([bad_text] if bad else []) + ([f"unreadable variants: {broken}"] if broken else [])
        return CheckOutcome(False, "; ".join(parts), details)

    clipping = outcome(clipped, "no variant peaks above 0 dBFS",
                       f"clipping (peak dBFS): {clipped}", {"levels": per, "sent_peak_dbfs": sent})
    if clipping.passed and overshoot:
        clipping = CheckOutcome(
            False, f"lossy overshoot, not clipping: decoded peak dBFS {overshoot} from a mix "
                   f"that peaked at {({v: sent[v] for v in overshoot})} dBFS (players decoding "
                   "to 16-bit integers clip those samples)", clipping.details, severity="warn")
    return {
        "duration": outcome(
            off, f"all variants within {tolerance_s * 1000:.0f} ms of the source "
                 f"({source_duration_s:.3f} s)",
            f"variants off the source duration {source_duration_s:.3f} s: {off}",
            {"source_s": source_duration_s, "variants_s": durations}),
        "clipping": clipping,
        "silence": outcome(silent, f"every variant's RMS is above {floor_dbfs} dBFS",
                           f"silent variants (RMS dBFS): {silent}", {"levels": per}),
    }


def check_manifest(output_dir: Path, listed: dict[str, dict] | None = None) -> CheckOutcome:
    """manifest.json validates against its schema and every listed file exists with the
    listed size and sha256. ``listed``: what the manifest's writer recorded of each file
    (``{path: {"sha256", "size_bytes", "mtime_ns"}}``); a file whose sha256 there is the
    manifest's and whose size and mtime are still the recorded ones is trusted without
    reading it again, any other file is hashed (appending to a file, replacing it, changes
    its size or mtime; a rewrite that keeps both is not seen)."""
    try:
        manifest = read_manifest(output_dir)
    except BundleError as exc:
        return CheckOutcome(False, f"manifest.json unreadable: {exc}")
    errors = schema_errors("manifest", manifest)
    if errors:
        return CheckOutcome(False, "manifest does not match its schema: " + "; ".join(errors[:3]))
    problems, hashed = [], 0
    for art in manifest["artifacts"]:
        file = Path(output_dir) / art["path"]
        if not file.is_file():
            problems.append(f"{art['path']}: missing")
            continue
        st = file.stat()
        known = (listed or {}).get(art["path"]) or {}
        if st.st_size != art["size_bytes"]:
            problems.append(f"{art['path']}: sha256/size differs from the manifest")
        elif known.get("sha256") == art["sha256"] and known.get("size_bytes") == st.st_size \
                and known.get("mtime_ns") == st.st_mtime_ns:
            continue  # unchanged since its hash was taken
        else:
            hashed += 1
            if sha256_file(file) != art["sha256"]:
                problems.append(f"{art['path']}: sha256/size differs from the manifest")
    if problems:
        return CheckOutcome(False, "; ".join(problems), {"problems": problems})
    return CheckOutcome(True, f"schema valid; {len(manifest['artifacts'])} files match their "
                              f"sha256", {"rehashed": hashed})
