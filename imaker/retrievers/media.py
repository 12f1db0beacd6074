"""Media helpers shared by the retrievers: read tags and covers with mutagen, write tags,
pull the audio track out of a video (ffmpeg)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..audio import FORMATS, AudioError, Tags, _stderr_tail, _tool, cover_mime, probe

#: file extensions the import retriever picks up
AUDIO_EXTENSIONS = {".mp3", ".m4a", ".mp4", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wav",
                    ".aif", ".aiff", ".wma", ".alac", ".ape", ".wv"}
#: extension -> the audio.Tags writer that handles it
TAG_FORMATS = {".m4a": "m4a", ".mp4": "m4a", ".m4v": "m4a", ".mp3": "mp3", ".flac": "flac"}


@dataclass
class FileTags:
    artist: str | None = None
    album: str | None = None
    title: str | None = None
    cover: bytes | None = None
    cover_mime: str | None = None

    @property
    def cover_ext(self) -> str | None:
        return {"image/jpeg": ".jpg", "image/png": ".png"}.get(self.cover_mime or "")


def _first(value) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def read_tags(path: Path) -> FileTags:
    """Artist/album/title and the front cover from any file mutagen understands; missing
    pieces are None (an untagged or unknown file gives an empty FileTags)."""
    import mutagen

    out = FileTags()
    try:
        easy = mutagen.File(path, easy=True)
    except Exception:  # noqa: BLE001 - a damaged tag block must not stop an import
        easy = None
    if easy is not None and easy.tags is not None:
        out.artist = _first(easy.tags.get("artist")) or _first(easy.tags.get("albumartist"))
        out.album = _first(easy.tags.get("album"))
        out.title = _first(easy.tags.get("title"))
    try:
        full = mutagen.File(path)
    except Exception:  # noqa: BLE001
        full = None
    if full is None:
        return out
    data = None
    tags = getattr(full, "tags", None)
    pictures = getattr(full, "pictures", None)  # FLAC
    if pictures:
        front = [p for p in pictures if p.type == 3] or list(pictures)
        data = front[0].data
    elif tags is not None and hasattr(tags, "getall"):  # ID3
        apic = tags.getall("APIC")
        if apic:
            front = [p for p in apic if p.type == 3] or apic
            data = front[0].data
    elif tags is not None and "covr" in tags:  # MP4
        covers = tags["covr"]
        data = bytes(covers[0]) if covers else None
    if data:
        mime = cover_mime(bytes(data))
        if mime:
            out.cover, out.cover_mime = bytes(data), mime
    return out


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
        [_tool("ffmpeg"), "-nostdin", "-v", "error", "-y", "-i", str(src), "-map", "0:a:0",
         "-vn", *codec_args, str(dest)], capture_output=True, timeout=3600)
    if proc.returncode != 0:
        raise AudioError(f"cannot extract the audio of {Path(src).name}: "
                         f"{_stderr_tail(proc.stderr)}")
    return Path(dest)
