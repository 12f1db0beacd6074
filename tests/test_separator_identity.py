"""Each checkout uses its own separation service (issue 23, point 10). Another install's
service that answers on SEPARATOR_PORT (other code, another model repo) is not used: this
checkout's processes start their own on another port and all of them find it there; a
service of this checkout is reused. Each "process" below is a new Python process, as each
Dagster run is."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import make_audio, stop_separator
from dagster_server import free_port
from imaker.separator.client import code_fingerprint

ROOT = Path(__file__).parents[1]

#: a run's view: its client from the settings, the service it finds or starts, and
#: (with arguments) one separation through it
CLIENT = """
import json, sys
import imaker
from imaker.separator.client import SeparatorClient
from imaker.settings import load_settings

client = SeparatorClient.from_settings(load_settings())
client.ensure_running()
out = {"imaker": imaker.__file__, "address": client.address, "health": client.health()}
if len(sys.argv) > 1:
    events = []
    client.separate(sys.argv[1], sys.argv[2], sys.argv[3], on_event=events.append)
    out["separated_by"] = next(e["pid"] for e in events if e["event"] == "accepted")
print(json.dumps(out))
"""


def _process(checkout: Path, env: dict, *args: str) -> dict:
    """A new process of ``checkout`` (its ``imaker`` package first on the path)."""
    proc = subprocess.run([sys.executable, "-c", CLIENT, *args], cwd=checkout,
                          env={**env, "PYTHONPATH": str(checkout)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert Path(out["imaker"]).is_relative_to(checkout), out["imaker"]
    return out


def test_each_checkout_uses_its_own_separation_service(imaker_env, model_repo, tmp_path,
                                                       monkeypatch):
    port = free_port()
    monkeypatch.setenv("SEPARATOR_PORT", str(port))
    env = dict(os.environ)
    # another checkout: the same package with one line changed, on the same machine, with
    # the same SEPARATOR_PORT; it is first to start its service
    other = tmp_path / "other-checkout"
    shutil.copytree(ROOT / "imaker", other / "imaker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(other / "imaker" / "separator" / "service.py", "a") as f:
        f.write("# another checkout's code\n")
    source = make_audio(tmp_path / "source.flac", 2.0)
    try:
        theirs = _process(other, env, "theirs", str(source), str(tmp_path / "stems_theirs"))
        assert theirs["address"] == f"http://127.0.0.1:{port}"
        assert theirs["health"]["identity"]["code"] != code_fingerprint()

        # this checkout's first run: the service on the port is not its own, so it starts
        # one on another port and its stems come from there
        ours = _process(ROOT, env, "ours", str(source), str(tmp_path / "stems_ours"))
        assert ours["address"] != theirs["address"]
        assert ours["health"]["identity"]["code"] == code_fingerprint()
        assert ours["health"]["pid"] != theirs["health"]["pid"]
        assert ours["separated_by"] == ours["health"]["pid"]
        assert theirs["separated_by"] == theirs["health"]["pid"]
        for stems in ("stems_theirs", "stems_ours"):
            assert json.loads((tmp_path / stems / "stems.json").read_text())

        # later processes of each checkout find their own again (reused, not restarted)
        again = _process(ROOT, env)
        assert (again["address"], again["health"]["pid"]) == (ours["address"],
                                                              ours["health"]["pid"])
        assert again["health"]["completed"] == 1
        theirs_again = _process(other, env)
        assert theirs_again["health"]["pid"] == theirs["health"]["pid"]

        # the same code with another model repo (another checkout's settings): its own too
        repo = tmp_path / "models-elsewhere"
        shutil.copytree(model_repo, repo)
        elsewhere = _process(ROOT, {**env, "DEMUCS_MODEL_REPO": str(repo)})
        assert elsewhere["health"]["identity"]["model_repo"] == str(repo.resolve())
        assert elsewhere["health"]["pid"] not in (ours["health"]["pid"],
                                                  theirs["health"]["pid"])
        assert elsewhere["address"] not in (ours["address"], theirs["address"])
    finally:
        stop_separator(port)  # theirs, and those started instead of it
