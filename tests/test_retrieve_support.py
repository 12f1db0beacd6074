"""Shared pieces of the retriever tests (no tests here): a local HTTP server on 127.0.0.1
serving ffmpeg-generated media and the pages yt-dlp's generic extractor reads."""

from __future__ import annotations

import functools
import json
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import make_audio, make_cover


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


def make_video(path: Path, seconds: float = 4.0) -> Path:
    """H.264 + AAC mp4 (a test pattern and a tone)."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc=size=160x120:rate=10:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=44100:duration={seconds}",
         "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
         "-c:a", "aac", "-ac", "2", "-shortest", str(path)], check=True)
    return path


def video_page(base: str, media: str, *, name: str, duration_s: float | None,
               author: str = "Test Channel", thumb: str | None = "thumb.jpg",
               upload_date: str = "2024-05-06") -> str:
    """An HTML page with a schema.org VideoObject (what many sites publish); yt-dlp's
    generic extractor reads title, duration, author, thumbnail and date from it."""
    obj = {"@context": "https://schema.org", "@type": "VideoObject", "name": name,
           "contentUrl": f"{base}/{media}", "uploadDate": upload_date,
           "author": {"@type": "Person", "name": author}}
    if duration_s is not None:
        obj["duration"] = f"PT{duration_s:g}S"
    if thumb:
        obj["thumbnailUrl"] = f"{base}/{thumb}"
    return ("<html><head><title>page</title><script type=\"application/ld+json\">"
            f"{json.dumps(obj)}</script></head><body>video</body></html>")


def rss_feed(base: str, items: list[tuple[str, str, str, float]]) -> str:
    """A podcast-style RSS feed: yt-dlp reads it as a playlist (one entry per item)."""
    body = "".join(
        f"<item><title>{title}</title><guid>{guid}</guid>"
        f"<enclosure url=\"{base}/{media}\" type=\"audio/mp4\"/>"
        f"<itunes:duration>{dur:g}</itunes:duration></item>"
        for guid, title, media, dur in items)
    return ("<?xml version=\"1.0\"?><rss version=\"2.0\" "
            "xmlns:itunes=\"http://www.itunes.com/dtds/podcast-1.0.dtd\"><channel>"
            f"<title>Test playlist</title>{body}</channel></rss>")


class MediaServer:
    def __init__(self, root: Path):
        self.root = root
        handler = functools.partial(_Quiet, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def add(self, name: str, text: str) -> str:
        (self.root / name).write_text(text, encoding="utf-8")
        return self.url(name)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def media_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    make_audio(root / "song.m4a", 4.0)
    make_audio(root / "other.m4a", 3.0, freq=220)
    make_video(root / "clip.mp4", 4.0)
    make_cover(root / "thumb.jpg")
    server = MediaServer(root)
    yield server
    server.close()


@pytest.fixture
def retr_env(imaker_env, monkeypatch):
    """imaker_env plus default retriever settings."""
    for key in ("YTDL_MODE", "YTDL_AUDIO_FORMAT", "YTDL_DURATION_TOL_SEC",
                "YTDL_DURATION_TOL_PCT", "DEEZER_ARL"):
        monkeypatch.delenv(key, raising=False)
    return imaker_env


def bundles(queue: Path) -> list[str]:
    return sorted(p.name for p in queue.iterdir() if p.name.startswith("job_")) \
        if queue.is_dir() else []
