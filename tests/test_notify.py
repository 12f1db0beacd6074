"""Notifications (NOTIFY_URLS): real Apprise against a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import JUNK_AUDIO, write_bundle
from imaker import notify, queues
from imaker.settings import SettingsError, load_settings

ROOT = Path(__file__).parents[1]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request (path, headers, JSON body)."""

    def __init__(self):
        self.requests: list[dict] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                received.append({"method": self.command, "path": self.path,
                                 "headers": dict(self.headers),
                                 "json": json.loads(body) if body else None})
                self.send_response(200)
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def messages(self, path: str) -> list[dict]:
        return [r["json"] for r in self.requests if r["path"].split("?")[0] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- settings ------------------------------------------------------------------------
def test_notify_settings_parse_and_reject_bad_urls():
    s = load_settings({"NOTIFY_URLS": " json://127.0.0.1:9/a,\njsons://h/b?+X-Emby-Token=k  "})
    assert s.notify.urls == ("json://127.0.0.1:9/a", "jsons://h/b?+X-Emby-Token=k")
    assert s.notify.on == ("done", "failed")
    assert load_settings({}).notify.urls == ()
    assert load_settings({"NOTIFY_ON": "failed"}).notify.on == ("failed",)
    with pytest.raises(SettingsError, match="NOTIFY_URLS.*not a valid Apprise URL.*nope://"):
        load_settings({"NOTIFY_URLS": "json://ok/x nope://secret@host"})
    with pytest.raises(SettingsError, match="NOTIFY_URLS"):
        load_settings({"NOTIFY_URLS": "just-a-word"})
    with pytest.raises(SettingsError, match="NOTIFY_ON"):
        load_settings({"NOTIFY_ON": "done,sometimes"})


# ----- messages --------------------------------------------------------------------------
def test_messages_from_manifest_and_error_json(tmp_path):
    out = tmp_path / "outputs"
    (out / "j1").mkdir(parents=True)
    (out / "j1" / "manifest.json").write_text(json.dumps({
        "job_id": "j1", "title": "Back in Black", "artist": "AC/DC", "album": "BiB",
        "artifacts": [{"kind": "audio", "variant": "instrumental", "path": "a.m4a"},
                      {"kind": "audio", "variant": "no_drums", "path": "b.m4a"},
                      {"kind": "video", "variant": "instrumental", "path": "c.mp4"}]}))
    done = notify.outcome_done(out, "j1")
    assert done.variants == ("instrumental", "no_drums")
    title, body = notify.message(done)
    assert title == "Instrumental ready: AC/DC - Back in Black"
    assert "Variants: instrumental, no_drums" in body
    assert f"Folder: {out / 'j1'}" in body and "Album: BiB" in body

    bundle = tmp_path / "failed" / "job_j2"
    bundle.mkdir(parents=True)
    (bundle / "job.json").write_text(json.dumps({"title": "T" * 5000, "artist": "X"}))
    (bundle / "error.json").write_text(json.dumps(
        {"job_id": "j2", "stage": "source_audio", "error": "cannot read audio.m4a: junk"}))
    stage, reason = queues.read_failure(bundle)
    failed = notify.outcome_failed("j2", stage, reason, bundle_dir=bundle)
    title, body = notify.message(failed)
    assert title.startswith("Instrumental failed: X - TTT") and len(title) < 400
    assert "at source_audio" in body and "Reason: cannot read audio.m4a: junk" in body

    # an unreadable bundle or manifest still gives a message, named by the job id
    (bundle / "job.json").write_text("{oops")
    assert notify.message(notify.outcome_failed("j2", "run", "x", bundle))[0] == \
        "Instrumental failed: j2"
    assert notify.outcome_done(out, "missing").name == "missing"
    assert queues.read_failure(tmp_path / "nowhere") is None


def test_send_posts_json_and_a_dead_receiver_is_a_result_not_an_error(receiver):
    outcome = notify.TrackOutcome("j1", "done", title="T", artist="A",
                                  variants=("instrumental",), folder="/o/j1")
    url = f"json://127.0.0.1:{receiver.port}/hook?+X-Emby-Token=secret"
    assert notify.send((url,), outcome).ok
    [req] = receiver.requests
    assert req["method"] == "POST" and req["headers"]["X-Emby-Token"] == "secret"
    assert req["json"]["title"] == "Instrumental ready: A - T"
    assert "Folder: /o/j1" in req["json"]["message"] and req["json"]["type"] == "success"

    start = time.monotonic()
    result = notify.send((f"json://127.0.0.1:{_dead_port()}/hook",), outcome)
    assert not result.ok and "127.0.0.1" in result.detail
    assert time.monotonic() - start < 15

    # a GET with query parameters (Plex / Navidrome rescans)
    get = f"json://127.0.0.1:{receiver.port}/rest/startScan?method=GET&-u=admin&-v=1.16.1"
    assert notify.send((get,), outcome).ok
    assert receiver.requests[-1]["method"] == "GET"
    assert receiver.requests[-1]["path"].startswith("/rest/startScan?")
    assert "u=admin" in receiver.requests[-1]["path"]


# ----- when: the run status sensors --------------------------------------------------------
def test_failed_run_notifies_only_when_dagster_will_not_retry_it(
        imaker_env, source_m4a, receiver, monkeypatch):
    """A dead run that Dagster will retry says nothing; the last one says "failed" with the
    reason, through the `notify_failed` run status sensor."""
    from dagster import DagsterEventType, DagsterInstance, build_run_status_sensor_context

    from imaker_assets.definitions import build_defs
    from sensors import queue_sensor
    from sensors.notify_sensor import notify_failed
    from resources import build_resources
    from dagster import build_sensor_context

    monkeypatch.setenv("NOTIFY_URLS", f"json://127.0.0.1:{receiver.port}/hook")
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    write_bundle(settings.paths.queue_other, "dies", source_m4a, title="Dead Song")
    ctx = build_sensor_context(instance=instance, definitions=defs,
                               resources=build_resources(settings))
    result = queue_sensor(ctx)
    [req] = result.run_requests
    job = defs.resolve_job_def("ingest_track")

    def dead_run(max_retries):
        run = instance.create_run_for_job(
            job, tags={**req.tags, "dagster/partition": "dies",
                       "dagster/max_retries": str(max_retries)})
        instance.report_run_failed(run, "Run worker died: exit code -9")
        run = instance.get_run_by_id(run.run_id)
        [event] = instance.get_records_for_run(
            run.run_id, of_type=DagsterEventType.RUN_FAILURE).records
        notify_failed(build_run_status_sensor_context(
            sensor_name="notify_failed", dagster_event=event.event_log_entry.dagster_event,
            dagster_instance=instance, dagster_run=run,
            resources=build_resources(settings)))
        return run

    assert dead_run(max_retries=2).tags["dagster/will_retry"] == "true"
    assert receiver.requests == []
    assert dead_run(max_retries=0).tags["dagster/will_retry"] == "false"
    [msg] = receiver.messages("/hook")
    assert msg["title"] == "Instrumental failed: AC/DC - Dead Song" and msg["type"] == "failure"
    assert "exit code -9" in msg["message"] and "after 2 attempts" in msg["message"]

    # a run canceled from the UI: "failed", through `notify_canceled`
    from sensors.notify_sensor import notify_canceled

    run = instance.create_run_for_job(job, tags={**req.tags, "dagster/partition": "dies"})
    instance.report_run_canceled(run)
    run = instance.get_run_by_id(run.run_id)
    [event] = instance.get_records_for_run(
        run.run_id, of_type=DagsterEventType.RUN_CANCELED).records
    notify_canceled(build_run_status_sensor_context(
        sensor_name="notify_canceled", dagster_event=event.event_log_entry.dagster_event,
        dagster_instance=instance, dagster_run=run,
            resources=build_resources(settings)))
    assert len(receiver.messages("/hook")) == 2
    assert f"run {run.run_id} was canceled" in receiver.messages("/hook")[1]["message"]


def _imaker(*args, env=None):
    exe = Path(sys.executable).with_name("imaker")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or os.environ.copy(), timeout=600)


def test_ingest_once_notifies_each_outcome_once_and_a_dead_receiver_does_not_matter(
        imaker_env, source_m4a, receiver, tmp_path, monkeypatch):
    """`imaker ingest --once` (its own short-lived daemon): one "done" with title, variants
    and folder, one "failed" with the reason, sent before the command returns; a second
    receiver that is down changes nothing for the tracks. A later daemon (the next
    `imaker ingest`) notifies its new track only, never the earlier ones again."""
    monkeypatch.setenv("NOTIFY_URLS", f"json://127.0.0.1:{receiver.port}/hook, "
                                      f"json://127.0.0.1:{_dead_port()}/down")
    s = load_settings()
    write_bundle(s.paths.queue_other, "good", source_m4a, title="Good Song")
    junk = tmp_path / "junk.m4a"
    junk.write_bytes(JUNK_AUDIO)
    write_bundle(s.paths.queue_other, "bad", junk, title="Bad Song")

    proc = _imaker("ingest", "--once")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["good"] == str(s.paths.outputs_dir / "good")
    assert lines["bad"].startswith("failed: source_audio: ")
    assert (s.paths.archive_dir / "done" / "job_good").is_dir()
    assert "not notified" not in proc.stderr

    msgs = receiver.messages("/hook")          # already there: the CLI waited for them
    assert len(msgs) == 2, msgs
    done = [m for m in msgs if m["type"] == "success"]
    failed = [m for m in msgs if m["type"] == "failure"]
    assert len(done) == 1 and len(failed) == 1, msgs
    assert done[0]["title"] == "Instrumental ready: AC/DC - Good Song"
    assert "Variants: instrumental, no_drums" in done[0]["message"]
    assert f"Folder: {s.paths.outputs_dir / 'good'}" in done[0]["message"]
    assert failed[0]["title"] == "Instrumental failed: AC/DC - Bad Song"
    assert "at source_audio" in failed[0]["message"]
    reason = json.loads((s.paths.archive_dir / "failed" / "job_bad" / "error.json").read_text())["error"]
    assert f"Reason: {reason}" in failed[0]["message"] and "cannot read audio.m4a" in reason

    # the next daemon starts from the sensors' stored cursors: only the new outcome
    write_bundle(s.paths.queue_other, "bad2", junk, title="Bad Again")
    again = _imaker("ingest", "--once")
    assert again.returncode == 1, again.stdout + again.stderr
    msgs = receiver.messages("/hook")
    assert len(msgs) == 3, msgs
    assert msgs[2]["title"] == "Instrumental failed: AC/DC - Bad Again"


def test_readme_rescan_urls_make_the_documented_requests(receiver):
    """Every media-server URL in the README's Notifications table, pointed at the local
    receiver, makes the request its row names (method, path, token header or parameter)."""
    import re
    from urllib.parse import parse_qs, urlsplit

    text = (ROOT / "README.md").read_text().split("## Notifications", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\w+)[^|]*\| `(jsons?://[^`]+)` \|$", text, re.M)
    assert {name for name, _ in rows} >= {"Jellyfin", "Plex", "Navidrome"}
    outcome = notify.TrackOutcome("j1", "done", title="T", variants=("instrumental",))
    for name, url in rows:
        local = re.sub(r"^json://[^/]+", f"json://127.0.0.1:{receiver.port}", url)
        assert notify.send((local,), outcome).ok, name
        req = receiver.requests[-1]
        parts = urlsplit(url.replace("json://", "http://"))
        query = {k: v for k, v in parse_qs(parts.query).items()}
        got = urlsplit(req["path"])
        assert got.path == parts.path, name
        assert req["method"] == query.get("method", ["POST"])[0], name
        for key, [value] in query.items():
            if key.startswith("+"):
                assert req["headers"][key[1:]] == value, name
            elif key.startswith("-"):
                assert parse_qs(got.query)[key[1:]] == [value], name
