"""mux_video: the source video stream copied (identical packets), the instrumental as AAC."""

from __future__ import annotations

import subprocess

import pytest

from conftest import make_audio
from imaker.audio import Tags, probe
from imaker.video import VideoError, mux_video
from test_retrieve_support import make_video


def _stream_md5(path, sel):
    return subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", sel,
                           "-c", "copy", "-f", "md5", "-"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _streams(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                          "stream=codec_type,codec_name", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout.split()
    return sorted(out)


@pytest.mark.parametrize("inst_ext", ["m4a", "flac"])
def test_mux_copies_video_and_muxes_instrumental(tmp_path, inst_ext):
    video = make_video(tmp_path / "src.mp4", 3.0)
    inst = make_audio(tmp_path / f"inst.{inst_ext}", 3.0, freq=880)
    dest = tmp_path / "out" / "Artist - Track.mp4"
    mux_video(video, inst, dest, tags=Tags(artist="A", title="T (instrumental)"))
    assert _streams(dest) == ["aac,audio", "h264,video"]
    assert _stream_md5(dest, "0:v:0") == _stream_md5(video, "0:v:0")  # no re-encode
    if inst_ext == "m4a":  # AAC in: copied as is
        assert _stream_md5(dest, "0:a:0") == _stream_md5(inst, "0:a:0")
    else:  # not AAC: the instrumental (not the source's audio) encoded to AAC
        assert _stream_md5(dest, "0:a:0") != _stream_md5(video, "0:a:0")
    info = probe(dest)
    assert abs(info["duration_s"] - 3.0) < 0.2 and info["audio"]["channels"] == 2
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temp file left
    from mutagen.mp4 import MP4
    assert MP4(dest).tags["\xa9nam"] == ["T (instrumental)"]


def test_mux_errors(tmp_path):
    audio = make_audio(tmp_path / "a.m4a", 1.0)
    with pytest.raises(VideoError, match="no video stream"):
        mux_video(audio, audio, tmp_path / "x.mp4")
    with pytest.raises(VideoError, match="must end in .mp4"):
        mux_video(audio, audio, tmp_path / "x.mkv")
    assert not (tmp_path / "x.mp4").exists()
