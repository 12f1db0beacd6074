"""The video artifact: the source video stream, copied bit for bit, with the instrumental
audio muxed in (no Dagster)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .audio import AudioError, Tags, tool_path, probe, write_failure
from .fsutil import atomic_path


class VideoError(AudioError):
    """A video that cannot be muxed; the message is for a person."""


def mux_video(video_src: Path, instrumental_audio: Path, dest: Path, *,
              audio_bitrate: str = "256k", tags: Tags | None = None,
              audio_codec: str | None = None) -> Path:
    """Write ``dest`` (.mp4): the first video stream of ``video_src`` stream-copied (never
    re-encoded) plus the first audio stream of ``instrumental_audio`` as AAC (copied when
    it already is AAC, else encoded at ``audio_bitrate``). Any audio of the source video is
    dropped. Written under a temporary name and renamed into place; tagged with ``tags``
    (mutagen) before the rename. ``audio_codec``: the audio's codec when the caller knows
    it (it wrote the file), else ffprobe tells."""
    video_src, instrumental_audio, dest = Path(video_src), Path(instrumental_audio), Path(dest)
    if dest.suffix.lower() != ".mp4":
        raise VideoError(f"{dest.name}: the video artifact must end in .mp4")
    vinfo = probe(video_src)
    if vinfo["video"] is None:
        raise VideoError(f"{video_src.name} has no video stream")
    if audio_codec is None:
        ainfo = probe(instrumental_audio)
        if ainfo["audio"] is None:
            raise VideoError(f"{instrumental_audio.name} has no audio stream")
        audio_codec = ainfo["audio"]["codec"]
    audio_args = (["-c:a", "copy"] if audio_codec == "aac"
                  else ["-c:a", "aac", "-b:a", audio_bitrate])
    with atomic_path(dest) as tmp:
        proc = subprocess.run(
            [tool_path("ffmpeg"), "-nostdin", "-v", "error", "-y", "-i", str(video_src),
             "-i", str(instrumental_audio), "-map", "0:v:0", "-map", "1:a:0",
             "-c:v", "copy", *audio_args, "-map_metadata", "-1", "-movflags", "+faststart",
             "-f", "mp4", str(tmp)], capture_output=True, timeout=3600)
        why = write_failure(proc.returncode, proc.stderr)
        if why is not None:
            raise VideoError(f"cannot mux {dest}: {why}")
        if tags is not None:
            tags.write(tmp, "m4a")  # mutagen's MP4 handles video files too
    return dest
