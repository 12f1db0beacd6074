"""README command 1's server for real: `dagster dev` (webserver + daemon) on 127.0.0.1
picks up a dropped bundle through the queue sensor and processes it; `scripts/serve.sh`
stops with everything it started on SIGTERM."""

import json
import os
import socket
import time
import urllib.request

from conftest import make_audio, write_bundle
from dagster_server import as_background_job, dagster_server, free_port, serving
from imaker.separator.client import SeparatorClient
from imaker.settings import load_settings


def _graphql(url, query):
    req = urllib.request.Request(f"{url}/graphql",
                                 data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]


def test_dagster_dev_sensor_processes_a_dropped_bundle(imaker_env, source_m4a, tmp_path):
    settings = load_settings()
    with dagster_server(["dagster", "dev"], tmp_path / "dagster_dev.log") as (proc, url):
        data = _graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes {"
                              " name sensors { name sensorState { status } } } } }"
                              " assetNodes { assetKey { path } } }")
        sensors = {s["name"]: s["sensorState"]["status"]
                   for repo in data["repositoriesOrError"]["nodes"] for s in repo["sensors"]}
        assert sensors["queue_sensor"] == "RUNNING" and sensors["catalog_automation"] == "RUNNING"
        assets = sorted(a["assetKey"]["path"][-1] for a in data["assetNodes"])
        assert assets == ["catalog", "manifest", "nas_copy", "separation_models", "source_audio",
                          "stems", "variants"]

        dropped = time.time()
        write_bundle(settings.paths.queue_youtube_audio, "dev_drop", source_m4a)
        manifest = settings.paths.outputs_dir / "dev_drop" / "manifest.json"
        deadline = time.time() + 300
        while not manifest.exists():
            failed = settings.paths.archive_dir / "failed" / "job_dev_drop" / "error.json"
            assert not failed.exists(), failed.read_text()
            assert proc.poll() is None and time.time() < deadline, \
                (tmp_path / "dagster_dev.log").read_text()[-3000:]
            time.sleep(2)
        assert json.loads(manifest.read_text())["job_id"] == "dev_drop"
        print(f"bundle dropped -> manifest written: {time.time() - dropped:.1f} s")
        deadline = time.time() + 60
        while not (settings.paths.archive_dir / "done" / "job_dev_drop").exists():
            assert time.time() < deadline
            time.sleep(1)
        runs = _graphql(url, '{ runsOrError { ... on Runs { results { status tags { key value } } } } }')
        tag_sets = [{t["key"]: t["value"] for t in r["tags"]} for r in runs["runsOrError"]["results"]]
        track_runs = [t for t in tag_sets if t.get("dagster/partition") == "dev_drop"]
        assert len(track_runs) == 1 and track_runs[0]["imaker/queue"] == "youtube_audio"
        # the catalog follows by itself (automation condition sensor)
        catalog = settings.paths.outputs_dir / "catalog.csv"
        deadline = time.time() + 180
        while not (catalog.exists() and "dev_drop" in catalog.read_text()):
            assert proc.poll() is None and time.time() < deadline, "catalog was not rebuilt"
            time.sleep(2)


def test_sigterm_stops_readme_command_1_and_everything_it_started(imaker_env, source_m4a,
                                                                   tmp_path, monkeypatch):
    """README command 1 (`scripts/serve.sh`, what `scripts/run.sh` execs) stopped as a
    supervisor stops it, after it processed a bundle: SIGTERM to the script's process, and
    every process it started — `dagster dev` and its children, the media server, the
    separation service the run used — is gone within 30 s (``dagster_server.stop_and_check``;
    nothing is killed unless the test fails), a track's run in flight included. Started as
    `nohup bash scripts/run.sh &` starts it (SIGINT ignored, which bash cannot undo): `dagster
    dev` then ignored SIGTERM."""
    port, media_port, separator_port = free_port(), free_port(), free_port()
    monkeypatch.setenv("SEPARATOR_PORT", str(separator_port))  # its own, not the session's
    settings = load_settings()
    env = {**os.environ, "DAGSTER_PORT": str(port), "MEDIA_PORT": str(media_port)}
    with serving(["bash", "scripts/serve.sh"], port, tmp_path / "serve.log", env=env,
                 timeout=180, preexec_fn=as_background_job, detached=True) as server:
        write_bundle(settings.paths.queue_other, "sigterm_1", source_m4a)
        done = settings.paths.archive_dir / "done" / "job_sigterm_1"
        deadline = time.time() + 300
        while not done.exists():  # polled: the pipeline says nothing else to the outside
            failed = settings.paths.archive_dir / "failed" / "job_sigterm_1" / "error.json"
            assert not failed.exists(), failed.read_text()
            assert server.proc.poll() is None and time.time() < deadline, \
                server.log.read_text()[-3000:]
            time.sleep(2)
        # the run's separation was made by the service serve.sh started (its child)
        client = SeparatorClient.from_settings(settings)
        health = client.health()
        assert health is not None and health["completed"] == 1, health
        tree = server.tree()
        assert health["pid"] in tree, (health["pid"], tree)
        commands = " | ".join(tree.values())
        for part in ("separator serve", "media serve", "dagster dev", "dagster_webserver",
                     "dagster._daemon run", "dagster code-server", "dagster api grpc"):
            assert part in commands, (part, tree)
        # and a second track in the middle of its separation: its run worker stops too
        write_bundle(settings.paths.queue_other, "sigterm_2", make_audio(tmp_path / "long.m4a", 60.0))
        deadline = time.time() + 300
        while not (client.health() or {}).get("active"):  # polled: as above
            assert time.time() < deadline, server.log.read_text()[-3000:]
            time.sleep(1)
        assert "multiprocessing.spawn" in " | ".join(server.tree().values())  # the run worker
        took = server.stop()
    print(f"SIGTERM -> {len(server.stopped_tree)} processes gone in {took:.1f} s: "
          + ", ".join(" ".join(c.split()[1:4]) for c in server.stopped_tree.values()))
    for p in (port, media_port, separator_port):  # and nothing listens any more
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0, p
