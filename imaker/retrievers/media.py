"""Media helpers shared by the retrievers: read tags and covers (``imaker.audio.read_tags``),
write tags, pull the audio track out of a video (ffmpeg)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..audio import (FORMATS, AudioError, FileTags, Tags, probe, read_tags, stderr_tail,
                     tool_path)

__all__ = ["AUDIO_EXTENSIONS", "TAG_FORMATS", "FileTags", "read_tags", "write_tags",
           "extract_audio"]

#: file extensions the import retriever picks up
AUDIO_EXTENSIONS = {".mp3", ".m4a", ".mp4", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wav",
                    ".aif", ".aiff", ".wma", ".alac", ".ape", ".wv"}
#: extension -> the audio.Tags writer that handles it
TAG_FORMATS = {".m4a": "m4a", ".mp4": "m4a", ".m4v": "m4a", ".mp3": "mp3", ".flac": "flac"}


def write_tags(path: Path, *, artist: str, title: str, album: str | None,
               cover: Path | None = None) -> bool:
    """Tag ``path`` in place (m4a/mp4, mp3, flac); False for a format we do not tag."""
    fmt = TAG_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        return False
    Tags(artist=artist, title=title, album=album, cover=cover).write(path, fmt)
    return True


def extract_audio(src: Path, dest: Path, fmt: str = "m4a", bitrate: str = "256k") -> Path:
    """The first audio stream of ``src`` as ``dest``: stream-copied when it already is the
    codec ``fmt`` stands for (AAC in m4a), else encoded."""
    info = probe(src)
    if info["audio"] is None:
        raise AudioError(f"{Path(src).name} has no audio stream")
    if fmt not in FORMATS:
        raise AudioError(f"cannot extract audio as {fmt!r}; use one of {', '.join(FORMATS)}")
    _, codec_args, codec = FORMATS[fmt]
    if info["audio"]["codec"] == codec:
        codec_args = ["-c:a", "copy"] + (["-movflags", "+faststart"] if fmt == "m4a" else [])
    elif fmt != "flac":
        codec_args = [*codec_args, "-b:a", bitrate]
    proc = subprocess.run(
        [tool_path("ffmpeg"), "-nostdin", "-v", "error", "-y", "-i", str(src), "-map", "0:a:0",
         "-vn", *codec_args, str(dest)], capture_output=True, timeout=3600)
    if proc.returncode != 0:
        raise AudioError(f"cannot extract the audio of {Path(src).name}: "
                         f"{stderr_tail(proc.stderr)}")
    return Path(dest)
