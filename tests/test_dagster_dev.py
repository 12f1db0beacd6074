"""README command 1's server for real: `dagster dev` (webserver + daemon) on 127.0.0.1
picks up a dropped bundle through the queue sensor and processes it."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import write_bundle
from imaker.settings import load_settings

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port, query):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                 data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]


def test_dagster_dev_sensor_processes_a_dropped_bundle(imaker_env, source_m4a, tmp_path):
    settings = load_settings()
    port = _free_port()
    log = open(tmp_path / "dagster_dev.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster")), "dev", "-w", "workspace.yaml",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "dagster_dev.log").read_text()[-3000:]
                assert time.time() < deadline, "dagster dev did not start"
                time.sleep(1)
        data = _graphql(port, "{ repositoriesOrError { ... on RepositoryConnection { nodes {"
                              " name sensors { name sensorState { status } } } } }"
                              " assetNodes { assetKey { path } } }")
        sensors = {s["name"]: s["sensorState"]["status"]
                   for repo in data["repositoriesOrError"]["nodes"] for s in repo["sensors"]}
        assert sensors["queue_sensor"] == "RUNNING" and sensors["catalog_automation"] == "RUNNING"
        assets = sorted(a["assetKey"]["path"][-1] for a in data["assetNodes"])
        assert assets == ["catalog", "manifest", "nas_copy", "source_audio", "stems", "variants"]

        write_bundle(settings.queue_youtube_audio, "dev_drop", source_m4a)
        manifest = settings.outputs_dir / "dev_drop" / "manifest.json"
        deadline = time.time() + 300
        while not manifest.exists():
            failed = settings.archive_dir / "failed" / "job_dev_drop" / "error.json"
            assert not failed.exists(), failed.read_text()
            assert proc.poll() is None and time.time() < deadline, \
                (tmp_path / "dagster_dev.log").read_text()[-3000:]
            time.sleep(2)
        assert json.loads(manifest.read_text())["job_id"] == "dev_drop"
        deadline = time.time() + 60
        while not (settings.archive_dir / "done" / "job_dev_drop").exists():
            assert time.time() < deadline
            time.sleep(1)
        runs = _graphql(port, '{ runsOrError { ... on Runs { results { status tags { key value } } } } }')
        tag_sets = [{t["key"]: t["value"] for t in r["tags"]} for r in runs["runsOrError"]["results"]]
        track_runs = [t for t in tag_sets if t.get("dagster/partition") == "dev_drop"]
        assert len(track_runs) == 1 and track_runs[0]["imaker/queue"] == "youtube_audio"
        # the catalog follows by itself (automation condition sensor)
        catalog = settings.outputs_dir / "catalog.csv"
        deadline = time.time() + 180
        while not (catalog.exists() and "dev_drop" in catalog.read_text()):
            assert proc.poll() is None and time.time() < deadline, "catalog was not rebuilt"
            time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
