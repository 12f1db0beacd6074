"""`imaker models`: weights fetched through demucs' own download table from a real HTTP
server on 127.0.0.1 (a mirror of the download root), verified by their checksum, listed;
a separation whose weights are missing fails at once with what to do."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from conftest import MODEL_NAME, claim_tags, write_bundle
from dagster_server import free_port
from imaker import models, separation
from imaker.fsutil import sha256_file
from imaker.settings import load_settings
from imaker_assets.assets import track_assets
from resources import build_resources

ROOT = Path(__file__).parents[1]


class _Mirror:
    """A static file server (a mirror of https://dl.fbaipublicfiles.com/demucs/) that
    counts the requests it answers."""

    def __init__(self, root: Path):
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                mirror.requests.append(self.path)

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path, model_repo):
    """demucs' table layout for the tiny model: a catalog (files.txt + <name>.yaml, as in
    demucs' package) and the weights under <root>/tiny/ on the server."""
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    [weights] = model_repo.glob("*.th")
    (catalog / "files.txt").write_text(f"# tiny test models\nroot: tiny/\n{weights.name}\n")
    shutil.copy(model_repo / f"{MODEL_NAME}.yaml", catalog)
    served = tmp_path / "served"
    (served / "tiny").mkdir(parents=True)
    shutil.copy(weights, served / "tiny" / weights.name)
    server = _Mirror(served)
    yield server, catalog, served / "tiny" / weights.name
    server.close()


def test_fetch_downloads_verifies_and_reuses(tmp_path, mirror):
    server, catalog, weights = mirror
    repo = tmp_path / "models"
    assert models.missing(MODEL_NAME, repo) is not None
    models.fetch([MODEL_NAME], repo, root_url=server.url, catalog=catalog, log=lambda m: None)
    assert server.requests == [f"/tiny/{weights.name}"]
    assert sorted(p.name for p in repo.iterdir()) == sorted([weights.name, f"{MODEL_NAME}.yaml"])
    assert (repo / weights.name).read_bytes() == weights.read_bytes()
    [entry] = models.installed(repo)
    assert entry.name == MODEL_NAME and not entry.missing and entry.files == (weights.name,)
    assert models.missing(MODEL_NAME, repo) is None
    loaded = separation.load_model(MODEL_NAME, repo, "cpu")  # what the service runs
    assert loaded.sources == ("drums", "bass", "other", "vocals")
    # already there: nothing is downloaded again
    models.fetch([MODEL_NAME], repo, root_url=server.url, catalog=catalog, log=lambda m: None)
    assert len(server.requests) == 1


def test_a_corrupted_download_is_refused_and_nothing_is_left(tmp_path, mirror):
    server, catalog, weights = mirror
    weights.write_bytes(b"not the model" * 1000)
    repo = tmp_path / "models"
    with pytest.raises(models.ModelError, match="does not match its checksum"):
        models.fetch([MODEL_NAME], repo, root_url=server.url, catalog=catalog,
                     log=lambda m: None)
    assert list(repo.iterdir()) == []


def test_demucs_table_names_its_own_urls():
    [bag] = models.plan(["htdemucs"])
    assert [url for _, url in bag.files] == [
        "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th"]
    with pytest.raises(models.ModelError, match="unknown demucs model 'nope'; known: .*htdemucs"):
        models.plan(["nope"])


def _imaker(*args, env=None):
    return subprocess.run([str(Path(sys.executable).with_name("imaker")), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **(env or {})})


def test_cli_fetch_offline_is_one_clear_line_and_list_shows_the_repo(tmp_path, model_repo):
    repo = tmp_path / "models"
    port = free_port()  # nothing listens there
    proc = _imaker("models", "fetch", "--url", f"http://127.0.0.1:{port}/", "htdemucs",
                   env={"DEMUCS_MODEL_REPO": str(repo)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"imaker: htdemucs: cannot download http://127.0.0.1:{port}/hybrid_transformer/"
        "955717e8-8726e21a.th: [Errno 111] Connection refused")
    assert not [p for p in repo.iterdir()]
    listed = _imaker("models", "list", env={"DEMUCS_MODEL_REPO": str(model_repo),
                                            "DEMUCS_MODEL": MODEL_NAME})
    assert listed.returncode == 0, listed.stdout + listed.stderr
    # family, architecture, stems, files, size, sha256 of each file, whether it loads
    [weights] = model_repo.glob("*.th")
    assert listed.stdout.startswith(
        f"{MODEL_NAME} (DEMUCS_MODEL): demucs, complete, HTDemucs, stems "
        "drums,bass,other,vocals, 1 file(s), "), listed.stdout
    assert f"sha256 {sha256_file(weights)}, loads\n" in listed.stdout
    # a damaged weight file: listed with the reason, exit status 1
    damaged = tmp_path / "damaged"
    shutil.copytree(model_repo, damaged)
    (damaged / weights.name).write_bytes(weights.read_bytes()[:1000])
    broken = _imaker("models", "list", env={"DEMUCS_MODEL_REPO": str(damaged),
                                            "DEMUCS_MODEL": MODEL_NAME})
    assert broken.returncode == 1
    assert "does not load: " in broken.stdout and "checksum" in broken.stdout, broken.stdout
    empty = _imaker("models", "list", env={"DEMUCS_MODEL_REPO": str(repo)})
    assert empty.stdout.startswith(f"no models in {repo}")
    # --if-missing: nothing to do when the repo has the model (README command 1)
    again = _imaker("models", "fetch", "--if-missing", "--url", f"http://127.0.0.1:{port}/",
                    env={"DEMUCS_MODEL_REPO": str(model_repo), "DEMUCS_MODEL": MODEL_NAME})
    assert again.returncode == 0 and again.stderr == ""


def test_missing_weights_fail_the_track_at_once_saying_what_to_do(imaker_env, source_m4a,
                                                                   tmp_path, monkeypatch):
    empty = tmp_path / "no_models"
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(empty))
    monkeypatch.setenv("DEMUCS_MODEL", "htdemucs")
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "nomodel_1", source_m4a)
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", ["nomodel_1"])
    result = materialize(track_assets, partition_key="nomodel_1", instance=instance,
                         resources=build_resources(settings), raise_on_error=False,
                         tags=claim_tags("nomodel_1"))
    assert not result.success
    error = json.loads((settings.paths.archive_dir / "failed" / "job_nomodel_1" / "error.json")
                       .read_text())
    assert error["stage"] == "stems"
    assert f"demucs model 'htdemucs' is not in the model repo {empty}" in error["error"]
    assert "imaker models fetch htdemucs" in error["error"]
    assert "URLError" not in error["error"]
    # one attempt, no retries
    starts = [e for e in result.all_events if e.event_type_value == "STEP_START"
              and e.step_key == "stems"]
    assert len(starts) == 1
