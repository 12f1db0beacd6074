"""The YouTube retriever against a local HTTP server: real yt-dlp downloads (generic
extractor), real ffmpeg/ffprobe, real mutagen. Durations are controlled through the pages
yt-dlp reads (schema.org VideoObject, RSS itunes:duration)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mutagen.mp4 import MP4

from imaker.audio import probe
from imaker.bundle import JobBundle
from imaker.retrievers.cli import run_retriever
from imaker.settings import load_settings
from test_retrieve_support import bundles, media_server, retr_env, rss_feed, video_page  # noqa: F401

ROOT = Path(__file__).parents[1]


def _only(queue: Path) -> JobBundle:
    names = bundles(queue)
    assert len(names) == 1, names
    return JobBundle.load(queue / names[0])


def test_audio_mode_page_with_duration_tags_cover_and_youtube_block(retr_env, media_server):
    s = load_settings()
    url = media_server.add("song.html", video_page(media_server.base, "song.m4a",
                                                   name="Back in Black", duration_s=4,
                                                   author="AC/DC Channel"))
    outcomes = run_retriever("youtube", [url], s, options={"mode": "audio"})
    assert [o.status for o in outcomes] == ["queued"], [o.line() for o in outcomes]
    b = _only(s.paths.queue_youtube_audio)
    assert bundles(s.paths.queue_youtube_video) == []
    assert b.job_id.startswith("yt_generic_song_") and b.source_type == "youtube"
    assert (b.title, b.artist, b.album) == ("Back in Black", "AC/DC Channel", "YTDL")
    yt = json.loads((b.root / "job.json").read_text())["youtube"]
    assert yt["video_id"] == "song" and yt["url"] == url and yt["channel"] == "AC/DC Channel"
    assert yt["duration_online_s"] == 4.0 and yt["duration_verified"] is True
    assert yt["upload_date"] == "2024-05-06" and "channel_id" in yt
    # tags on the downloaded audio: Artist = channel, Album = YTDL, Title = title, cover
    tags = MP4(b.media_path("audio")).tags
    assert tags["\xa9ART"] == ["AC/DC Channel"] and tags["\xa9alb"] == ["YTDL"]
    assert tags["\xa9nam"] == ["Back in Black"] and len(tags["covr"]) == 1
    assert b.cover == "cover.jpg" and b.media_path("cover").read_bytes()[:3] == b"\xff\xd8\xff"
    assert probe(b.media_path("audio"))["audio"]["codec"] == "aac"
    # nothing left behind: no .tmp, no staging files
    assert [p.name for p in s.paths.queue_youtube_audio.iterdir() if p.name.endswith(".tmp")] == []
    assert list((s.paths.data_dir / "retrievers" / "staging").iterdir()) == []


def test_direct_url_has_no_online_duration_and_says_so(retr_env, media_server):
    s = load_settings()
    outcomes = run_retriever("youtube", [media_server.url("other.m4a")], s)  # YTDL_MODE=audio
    assert [o.status for o in outcomes] == ["queued"]
    b = _only(s.paths.queue_youtube_audio)
    yt = b.youtube.to_dict()
    assert yt["duration_online_s"] is None and yt["duration_verified"] is False
    assert "no duration" in yt["duration_check"]
    assert abs(yt["duration_measured_s"] - 3.0) < 0.1
    assert b.artist == media_server.base.removeprefix("http://")  # no channel: the site


def test_duration_mismatch_is_rejected_and_writes_nothing(retr_env, media_server):
    s = load_settings()
    url = media_server.add("long.html", video_page(media_server.base, "song.m4a",
                                                   name="Too long", duration_s=60))
    outcomes = run_retriever("youtube", [url], s)
    assert len(outcomes) == 1 and outcomes[0].status == "rejected"
    assert "duration mismatch" in outcomes[0].message and "60.00" in outcomes[0].message
    assert bundles(s.paths.queue_youtube_audio) == [] and bundles(s.paths.queue_youtube_video) == []
    assert list((s.paths.data_dir / "retrievers" / "staging").iterdir()) == []


def test_duration_within_percent_tolerance(retr_env, media_server, monkeypatch):
    # 4 s file, 4.9 s online: outside 0.5 s, inside 25 %
    monkeypatch.setenv("YTDL_DURATION_TOL_SEC", "0.5")
    monkeypatch.setenv("YTDL_DURATION_TOL_PCT", "0.25")
    s = load_settings()
    url = media_server.add("pct.html", video_page(media_server.base, "song.m4a", name="Pct",
                                                  duration_s=4.9))
    assert [o.status for o in run_retriever("youtube", [url], s)] == ["queued"]
    monkeypatch.setenv("YTDL_DURATION_TOL_PCT", "0.01")
    url2 = media_server.add("pct2.html", video_page(media_server.base, "other.m4a",
                                                    name="Pct2", duration_s=3.9))
    out = run_retriever("youtube", [url2], load_settings())
    assert out[0].status == "rejected" and "tolerance 0.50 s" in out[0].message


def test_video_mode_routes_to_video_queue_with_mp4_and_audio(retr_env, media_server):
    s = load_settings()
    url = media_server.add("clip.html", video_page(media_server.base, "clip.mp4",
                                                   name="Clip", duration_s=4))
    outcomes = run_retriever("youtube", [url], s, options={"mode": "video"})
    assert [o.status for o in outcomes] == ["queued"]
    assert bundles(s.paths.queue_youtube_audio) == []
    b = _only(s.paths.queue_youtube_video)
    assert b.job_id.endswith("_video") and b.video == "video.mp4" and b.audio == "audio.m4a"
    v = probe(b.media_path("video"))
    assert v["video"]["codec"] == "h264" and v["audio"] is not None
    a = probe(b.media_path("audio"))
    assert a["video"] is None and a["audio"]["codec"] == "aac"
    assert MP4(b.media_path("audio")).tags["\xa9ART"] == ["Test Channel"]


def test_both_mode_playlist_one_bundle_per_entry(retr_env, media_server):
    s = load_settings()
    feed = media_server.add("feed.xml", rss_feed(media_server.base, [
        ("e1", "First", "song.m4a", 4), ("e2", "Second", "clip.mp4", 4)]))
    outcomes = run_retriever("youtube", [feed], s, options={"mode": "both"})
    by = [(o.status, o.queue) for o in outcomes]
    # audio-only entry: audio bundle + skipped video; video entry: both bundles
    assert by == [("queued", "youtube_audio"), ("skipped", None),
                  ("queued", "youtube_audio"), ("queued", "youtube_video")], by
    audio = [JobBundle.load(s.paths.queue_youtube_audio / n) for n in bundles(s.paths.queue_youtube_audio)]
    assert sorted(b.title for b in audio) == ["First", "Second"]
    assert all(b.youtube.duration_online_s == 4 for b in audio)
    video = _only(s.paths.queue_youtube_video)
    assert video.title == "Second" and probe(video.media_path("video"))["video"] is not None


def test_failing_url_among_good_ones_and_duplicates(retr_env, media_server):
    s = load_settings()
    good = media_server.url("song.m4a")
    missing = media_server.url("missing.m4a")
    out = run_retriever("youtube", [missing, good, "not a url at all"], s)
    assert [o.status for o in out] == ["failed", "queued", "failed"], [o.line() for o in out]
    assert "404" in out[0].message
    assert len(bundles(s.paths.queue_youtube_audio)) == 1
    # the same source again: a duplicate, nothing downloaded or written
    again = run_retriever("youtube", [good], s)
    assert [o.status for o in again] == ["duplicate"] and again[0].job_id == out[1].job_id
    # still waiting in the queue: even --force cannot write a second job_<id>/
    forced = run_retriever("youtube", [good], s, force=True)
    assert forced[0].status == "duplicate" and "already waiting" in forced[0].message
    # once the processor took it, --force queues it again
    (s.paths.queue_youtube_audio / f"job_{out[1].job_id}").rename(s.paths.data_dir / "taken")
    assert run_retriever("youtube", [good], s)[0].status == "duplicate"
    assert run_retriever("youtube", [good], s, force=True)[0].status == "queued"


def test_cli_retrieve_youtube_subprocess(retr_env, media_server):
    s = load_settings()
    proc = subprocess.run(
        [sys.executable, "-m", "imaker.retrievers.cli", "retrieve", "youtube", "--mode",
         "audio", media_server.url("song.m4a"), media_server.url("nope.m4a")],
        capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and ": queued yt_generic_song_" in lines[0]
    assert "failed:" in lines[1] and "404" in lines[1]
    assert len(bundles(s.paths.queue_youtube_audio)) == 1
    listing = subprocess.run([sys.executable, "-m", "imaker.retrievers.cli", "retrieve", "--list"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert listing.returncode == 0
    assert {line.split()[0] for line in listing.stdout.splitlines()} >= {"youtube", "deezer", "import"}


@pytest.mark.parametrize("mode", ["bogus"])
def test_bad_mode_is_a_usage_error(retr_env, mode):
    from imaker.retrievers import RetrieverError

    with pytest.raises(RetrieverError, match="mode 'bogus'"):
        run_retriever("youtube", ["x"], load_settings(), options={"mode": mode})
