"""Listen from the UI: the media server for real (`imaker media serve`, uvicorn on a free
127.0.0.1 port, requests over HTTP), the library page, and the MEDIA_* settings."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_audio, make_cover
from imaker import media
from imaker.fsutil import current_umask
from imaker.settings import SettingsError, load_settings

ODD_NAME = "AC_DC - Hash #1 100% (no drum).m4a"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(port: int, path: str, method: str = "GET", headers: dict | None = None):
    """One raw HTTP request (the path is sent exactly as given: no client-side
    normalization of `..` or `%2f`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("media")
    outputs, library = base / "outputs", base / "library"
    audio = outputs / "job1" / "files" / "audio"
    make_audio(audio / "AC_DC - Song.m4a", 2.0)
    make_audio(audio / "AC_DC - Song.mp3", 1.0)
    make_audio(outputs / "job1" / "files" / "video" / "AC_DC - Song.mp4", 1.0)
    (audio / ODD_NAME).write_bytes((audio / "AC_DC - Song.m4a").read_bytes())
    make_audio(library / "job1" / "source.flac", 2.0)
    make_cover(library / "job1" / "cover.jpg")
    (outputs / "job1" / ".manifest.json.part").write_text("{}")       # a temporary file
    (library / "job1" / ".imaker").mkdir()
    (library / "job1" / ".imaker" / "x.json").write_text("{}")
    secret = base / "secret.txt"                                     # outside both roots
    secret.write_text("do not serve")
    (outputs / "job1" / "leak.txt").symlink_to(secret)
    (outputs / "job1" / "leakdir").symlink_to(base)
    (library / "job1" / "inside.flac").symlink_to(library / "job1" / "source.flac")
    return outputs, library, secret


@pytest.fixture(scope="module")
def server(roots):
    """`imaker media serve` as README command 1 starts it (settings from the environment)."""
    outputs, library, _ = roots
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIA_")}
    env.update(OUTPUTS_DIR=str(outputs), LIBRARY_DIR=str(library), MEDIA_PORT=str(port),
               IMAKER_DATA=str(outputs.parent / "data"))
    log = open(outputs.parent / "media.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "imaker.cli", "media", "serve"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while True:
        try:
            if _request(port, "/health")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError((outputs.parent / "media.log").read_text())
        time.sleep(0.1)
    yield port
    proc.terminate()
    # uvicorn shuts down gracefully, then re-raises the signal (exit status -SIGTERM)
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    log.close()
    assert "Finished server process" in (outputs.parent / "media.log").read_text()


def _path(url: str) -> str:
    """The path of an absolute link, as a browser sends it."""
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


def test_range_requests_return_206_with_the_requested_bytes(server, roots):
    outputs, _, _ = roots
    path = outputs / "job1" / "files" / "audio" / "AC_DC - Song.m4a"
    data = path.read_bytes()
    url = "/outputs/job1/files/audio/AC_DC%20-%20Song.m4a"
    status, headers, body = _request(server, url)
    assert status == 200 and body == data
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == "audio/mp4"

    status, headers, body = _request(server, url, headers={"Range": "bytes=100-199"})
    assert status == 206
    assert headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert headers["content-length"] == "100" and body == data[100:200]

    status, headers, body = _request(server, url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert status == 206 and body == data[-10:]
    assert headers["content-range"] == f"bytes {len(data) - 10}-{len(data) - 1}/{len(data)}"

    status, headers, _ = _request(server, url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"

    status, headers, body = _request(server, url, method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(data))
    # a player revalidating: ETag works
    status, _, _ = _request(server, url, headers={"If-None-Match": headers["etag"]})
    assert status == 304


def test_media_types_and_quoted_links(server, roots):
    outputs, library, _ = roots
    base = f"http://127.0.0.1:{server}"
    cases = {
        media.output_url(base, "job1", "files/audio/AC_DC - Song.mp3"): "audio/mpeg",
        media.output_url(base, "job1", "files/video/AC_DC - Song.mp4"): "video/mp4",
        media.output_url(base, "job1", f"files/audio/{ODD_NAME}"): "audio/mp4",
        media.source_url(base, "job1"): "audio/flac",
        media.media_url(base, "library", "job1/cover.jpg"): "image/jpeg",
        media.media_url(base, "library", "job1/inside.flac"): "audio/flac",  # symlink inside
    }
    assert "%23" in media.output_url(base, "job1", ODD_NAME)  # '#' would end the path
    for url, expected in cases.items():
        status, headers, body = _request(server, _path(url))
        assert (status, headers["content-type"]) == (200, expected), url
        assert len(body) > 100
    status, _, body = _request(server, _path(media.source_url(base, "job1")))
    assert body == (library / "job1" / "source.flac").read_bytes()


@pytest.mark.parametrize("path", [
    "/outputs/..%2fsecret.txt",
    "/outputs/..%2f..%2fsecret.txt",
    "/outputs/%2e%2e/secret.txt",
    "/outputs/../secret.txt",
    "/library/job1/..%2f..%2fsecret.txt",
    "/outputs/job1/leak.txt",                 # symlink to a file outside the root
    "/outputs/job1/leakdir/secret.txt",       # symlink to a folder outside the root
    "/outputs/..%2flibrary/job1/source.flac",  # the other root, not through its own prefix
    "/outputs/job1/.manifest.json.part",      # hidden / temporary files
    "/library/job1/.imaker/x.json",
    "/outputs/job1",                          # no directory listings
    "/outputs/job1/",
    "/outputs/",
    "/outputs/job1/files/audio/missing.m4a",
    "/secret.txt",
    "/etc/passwd",
    "//etc/passwd",
    "/outputs//etc/passwd",
    "/outputs/%2fetc%2fpasswd",
])
def test_nothing_outside_the_roots_is_served(server, roots, path):
    status, _, body = _request(server, path)
    assert status == 404, (path, status, body[:200])
    assert b"do not serve" not in body and b"root:" not in body


def test_only_get_and_head(server):
    status, _, _ = _request(server, "/outputs/job1/files/audio/AC_DC%20-%20Song.m4a", "POST")
    assert status == 405
    status, _, _ = _request(server, "/", "DELETE")
    assert status == 405


def test_root_serves_the_library_page(server, roots):
    outputs, library, _ = roots
    status, headers, body = _request(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"No tracks yet" in body
    _manifest(outputs, "job1", title="Song", created="2026-01-01T00:00:00Z",
              files=["files/audio/AC_DC - Song.m4a"])
    media.write_library_page(outputs, library)
    status, headers, body = _request(server, "/")
    assert status == 200 and b"<audio controls preload=\"metadata\"" in body
    assert b"library/job1/source.flac" in body
    (outputs / "job1" / "manifest.json").unlink()
    (outputs / media.PAGE_FILE).unlink()


# ----- the library page (no server) ----------------------------------------------------
def _manifest(outputs: Path, job_id: str, *, title: str, created: str, files: list[str],
              artist: str = "AC/DC", album: str = "Album", duration: float = 2.0) -> None:
    arts = [{"kind": "audio", "variant": "instrumental" if i == 0 else f"v{i}",
             "label": f"Label {i}", "path": f, "codec": "aac", "duration_s": duration,
             "sample_rate": 44100, "channels": 2, "size_bytes": 1, "sha256": "x"}
            for i, f in enumerate(files)]
    (outputs / job_id).mkdir(parents=True, exist_ok=True)
    (outputs / job_id / "manifest.json").write_text(json.dumps({
        "schema_version": 1, "job_id": job_id, "source_type": "local", "artist": artist,
        "album": album, "title": title, "artifacts": arts,
        "provenance": {"source": {"duration_s": duration}, "created_at": created}}))


def test_library_page_escapes_quotes_and_sorts_newest_first(tmp_path):
    outputs, library = tmp_path / "outputs", tmp_path / "library"
    hostile = '<script>alert("x")</script> & "quotes"'
    name = "files/audio/A#B <x> 100%.m4a"
    make_audio(outputs / "old" / name, 0.5)
    make_audio(outputs / "new" / "files" / "audio" / "n.m4a", 0.5)
    make_audio(library / "old" / "source.flac", 0.5)
    make_cover(library / "old" / "cover.jpg")
    _manifest(outputs, "old", title=hostile, artist="<b>bold</b>", created="2026-01-01T00:00:00Z",
              files=[name, "files/audio/missing.m4a"], duration=125.4)
    _manifest(outputs, "new", title="Newer", created="2026-02-01T00:00:00Z",
              files=["files/audio/n.m4a"])
    _manifest(outputs, "forgotten", title="Forgotten", created="2026-03-01T00:00:00Z", files=[])
    (outputs / "broken").mkdir()
    (outputs / "broken" / "manifest.json").write_text("{not json")

    entries = media.library_entries(outputs, library, ["old", "new", "broken"])
    assert [e["job_id"] for e in entries] == ["new", "old"]            # newest first, filtered
    old = entries[1]
    assert old["cover"] == "library/old/cover.jpg" and old["duration"] == "2:05"
    # the original first, then each variant that exists (the missing file has no player)
    assert [p["variant"] for p in old["players"]] == ["original", "instrumental"]
    assert old["players"][0]["url"] == "library/old/source.flac"
    assert old["players"][1]["url"] == "outputs/old/files/audio/A%23B%20%3Cx%3E%20100%25.m4a"
    assert entries[0]["cover"] is None
    assert [p["variant"] for p in entries[0]["players"]] == ["instrumental"]  # no source kept

    umask = current_umask()
    page = media.write_library_page(outputs, library, ["old", "new"])
    assert page == outputs / "index.html"
    assert page.stat().st_mode & 0o777 == 0o666 & ~umask
    text = page.read_text()
    assert "<script>" not in text and "<b>bold</b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;quotes&quot;" in text
    assert text.index("Newer") < text.index("&lt;script&gt;")
    assert text.count('<audio controls preload="metadata"') == 3
    assert "Forgotten" not in text
    assert not list(outputs.glob(".*part*"))                           # atomic: no leftovers


def test_media_settings():
    s = load_settings({})
    assert (s.media.host, s.media.port, s.media.base_url) == ("127.0.0.1", 8766,
                                                              "http://127.0.0.1:8766")
    s = load_settings({"MEDIA_HOST": "0.0.0.0", "MEDIA_PORT": "9000"})
    assert s.media.base_url == "http://127.0.0.1:9000"      # links: loopback, not 0.0.0.0
    s = load_settings({"MEDIA_BASE_URL": "https://music.example/imaker/"})
    assert s.media.base_url == "https://music.example/imaker"
    assert media.page_url(s.media.base_url) == "https://music.example/imaker/"
    assert media.source_url(s.media.base_url, "j") == "https://music.example/imaker/library/j/source.flac"
    for bad in ({"MEDIA_PORT": "0"}, {"MEDIA_PORT": "x"}, {"MEDIA_BASE_URL": "music.example"}):
        with pytest.raises(SettingsError):
            load_settings(bad)
