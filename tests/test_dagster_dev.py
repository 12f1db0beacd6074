"""README command 1's server for real: `dagster dev` (webserver + daemon) on 127.0.0.1
picks up a dropped bundle through the queue sensor and processes it."""

import json
import time
import urllib.request

from conftest import write_bundle
from dagster_server import dagster_server
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
        assert assets == ["catalog", "manifest", "nas_copy", "source_audio", "stems", "variants"]

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
