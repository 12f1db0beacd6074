"""Audio decode / encode / probe / tag with the real ffmpeg, ffprobe and mutagen (no Dagster)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .fsutil import atomic_path

FORMATS = {
    # name: (extension, ffmpeg codec args, manifest codec)
    "m4a": (".m4a", ["-c:a", "aac", "-movflags", "+faststart"], "aac"),
    "mp3": (".mp3", ["-c:a", "libmp3lame"], "mp3"),
    "flac": (".flac", ["-c:a", "flac", "-sample_fmt", "s32", "-bits_per_raw_sample", "24"], "flac"),
}
MAX_COVER_BYTES = 10 * 1024 * 1024


class AudioError(RuntimeError):
    """Audio that cannot be decoded, encoded or probed; the message is for a person."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AudioError(f"{name} is not installed (apt-get install ffmpeg)")
    return path


def _stderr_tail(stderr: bytes, lines: int = 3) -> str:
    text = stderr.decode("utf-8", "replace").strip().splitlines()
    return " | ".join(text[-lines:]) if text else "no message"


def probe(path: Path) -> dict:
    """ffprobe a media file: {'duration_s', 'audio': {...} | None, 'video': {...} | None}."""
    proc = subprocess.run(
        [_tool("ffprobe"), "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise AudioError(f"cannot read {Path(path).name}: {_stderr_tail(proc.stderr)}")
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams", [])
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not s.get("disposition", {}).get("attached_pic")), None)
    duration = info.get("format", {}).get("duration")
    return {
        "duration_s": float(duration) if duration not in (None, "N/A") else None,
        "audio": None if audio is None else {
            "codec": audio.get("codec_name"), "sample_rate": int(audio.get("sample_rate", 0)),
            "channels": int(audio.get("channels", 0))},
        "video": None if video is None else {"codec": video.get("codec_name")},
    }


def decode(path: Path, samplerate: int, channels: int) -> np.ndarray:
    """Decode the first audio stream of ``path`` to float32 ``(channels, samples)``."""
    proc = subprocess.run(
        [_tool("ffmpeg"), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
         "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(samplerate),
         "pipe:1"], capture_output=True)
    if proc.returncode != 0:
        raise AudioError(f"cannot decode {Path(path).name}: {_stderr_tail(proc.stderr)}")
    data = np.frombuffer(proc.stdout, dtype="<f4")
    if data.size < channels:
        raise AudioError(f"cannot decode {Path(path).name}: no audio samples")
    frames = data.size // channels
    audio = data[: frames * channels].reshape(frames, channels).T.copy()
    if not np.isfinite(audio).all():
        raise AudioError(f"{Path(path).name} decodes to non-finite samples")
    return audio


def encode(audio: np.ndarray, samplerate: int, dest: Path, fmt: str, bitrate: str = "256k",
           tags: "Tags | None" = None) -> Path:
    """Encode float ``(channels, samples)`` to ``dest`` in format ``fmt`` and tag it.

    Written to a temporary name and renamed into place after tagging: a crash never
    leaves a half-written file under the final name."""
    if fmt not in FORMATS:
        raise AudioError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    ext, codec_args, _ = FORMATS[fmt]
    dest = Path(dest)
    if dest.suffix != ext:
        raise AudioError(f"{dest.name}: a {fmt} file must end in {ext}")
    channels = audio.shape[0]
    bitrate_args = [] if fmt == "flac" else ["-b:a", bitrate]
    pcm = np.ascontiguousarray(audio.T, dtype="<f4").tobytes()
    with atomic_path(dest) as tmp:
        proc = subprocess.run(
            [_tool("ffmpeg"), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(samplerate),
             "-ac", str(channels), "-i", "pipe:0", *codec_args, *bitrate_args, str(tmp)],
            input=pcm, capture_output=True)
        if proc.returncode != 0:
            raise AudioError(f"cannot encode {dest.name}: {_stderr_tail(proc.stderr)}")
        if tags is not None:
            tags.write(tmp, fmt)
    return dest


def codec_name(fmt: str) -> str:
    return FORMATS[fmt][2]


def extension(fmt: str) -> str:
    return FORMATS[fmt][0]


def cover_mime(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return None


class Tags:
    """Artist/album/title/cover/job-id tags, written with mutagen for m4a, mp3 and flac."""

    def __init__(self, artist: str, title: str, album: str | None = None,
                 cover: Path | None = None, job_id: str | None = None,
                 variant: str | None = None):
        self.artist, self.title, self.album = artist, title, album
        self.job_id, self.variant = job_id, variant
        self.cover_data: bytes | None = None
        self.cover_mime: str | None = None
        if cover is not None:
            data = Path(cover).read_bytes()[: MAX_COVER_BYTES + 1]
            mime = cover_mime(data)
            if mime and len(data) <= MAX_COVER_BYTES:
                self.cover_data, self.cover_mime = data, mime

    def write(self, path: Path, fmt: str) -> None:
        getattr(self, f"_write_{fmt}")(Path(path))

    def _custom(self) -> dict[str, str]:
        out = {}
        if self.job_id:
            out["IMAKER_JOB_ID"] = self.job_id
        if self.variant:
            out["IMAKER_VARIANT"] = self.variant
        return out

    def _write_m4a(self, path: Path) -> None:
        from mutagen.mp4 import MP4, MP4Cover, MP4FreeForm

        audio = MP4(path)
        if audio.tags is None:
            audio.add_tags()
        tags = audio.tags
        tags["\xa9ART"] = [self.artist]
        tags["\xa9nam"] = [self.title]
        if self.album:
            tags["\xa9alb"] = [self.album]
        if self.cover_data:
            fmt = MP4Cover.FORMAT_PNG if self.cover_mime == "image/png" else MP4Cover.FORMAT_JPEG
            tags["covr"] = [MP4Cover(self.cover_data, imageformat=fmt)]
        for key, value in self._custom().items():
            tags[f"----:com.apple.iTunes:{key}"] = [MP4FreeForm(value.encode("utf-8"))]
        audio.save()

    def _write_mp3(self, path: Path) -> None:
        from mutagen.id3 import APIC, ID3, TALB, TIT2, TPE1, TXXX, ID3NoHeaderError

        try:
            tags = ID3(path)
        except ID3NoHeaderError:
            tags = ID3()
        tags.add(TPE1(encoding=3, text=[self.artist]))
        tags.add(TIT2(encoding=3, text=[self.title]))
        if self.album:
            tags.add(TALB(encoding=3, text=[self.album]))
        if self.cover_data:
            tags.add(APIC(encoding=3, mime=self.cover_mime, type=3, desc="Cover",
                          data=self.cover_data))
        for key, value in self._custom().items():
            tags.add(TXXX(encoding=3, desc=key, text=[value]))
        tags.save(path)

    def _write_flac(self, path: Path) -> None:
        from mutagen.flac import FLAC, Picture

        audio = FLAC(path)
        audio["ARTIST"] = self.artist
        audio["TITLE"] = self.title
        if self.album:
            audio["ALBUM"] = self.album
        for key, value in self._custom().items():
            audio[key] = value
        if self.cover_data:
            pic = Picture()
            pic.type, pic.mime, pic.data = 3, self.cover_mime, self.cover_data
            audio.clear_pictures()
            audio.add_picture(pic)
        audio.save()
