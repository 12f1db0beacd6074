"""Issue acceptance, as a user types it: `imaker retrieve` / `imaker import` then
`imaker ingest --once`, all through the real console script."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mutagen.easyid3 import EasyID3

from conftest import make_audio
from imaker.audio import probe
from imaker.settings import load_settings
from test_retrieve_support import media_server, retr_env, video_page  # noqa: F401 (fixtures)

ROOT = Path(__file__).parents[1]


def _imaker(*args):
    exe = Path(sys.executable).with_name("imaker")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT,
                          env=os.environ.copy(), timeout=600)


def test_retrieve_both_modes_then_ingest_gives_audio_and_video_outputs(retr_env, media_server):
    s = load_settings()
    url = media_server.add("e2e.html", video_page(media_server.base, "clip.mp4",
                                                  name="Clip Title", duration_s=4))
    got = _imaker("retrieve", "youtube", "--mode", "both", url)
    assert got.returncode == 0, got.stdout + got.stderr
    ingest = _imaker("ingest", "--once")
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    jobs = dict(line.split(": ", 1) for line in ingest.stdout.strip().splitlines())
    assert len(jobs) == 2
    video_job = next(j for j in jobs if j.endswith("_video"))
    audio_job = next(j for j in jobs if not j.endswith("_video"))
    man = json.loads((s.paths.outputs_dir / video_job / "manifest.json").read_text())
    [video] = [a for a in man["artifacts"] if a["kind"] == "video"]
    mp4 = s.paths.outputs_dir / video_job / video["path"]
    assert video["path"].startswith("files/video/") and video["path"].endswith("Clip Title.mp4")
    info = probe(mp4)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert video["codec"] == "h264+aac"
    audio_man = json.loads((s.paths.outputs_dir / audio_job / "manifest.json").read_text())
    assert {a["variant"] for a in audio_man["artifacts"]} == {"instrumental", "no_drums"}
    assert audio_man["provenance"]["source"]["url"]


def test_import_tagged_tree_then_ingest(retr_env, tmp_path):
    s = load_settings()
    tree = tmp_path / "library"
    tagged = make_audio(tree / "Whatever" / "01 - track.mp3", 2.0)
    tags = EasyID3()
    tags.update({"artist": "Tagged Artist", "album": "Tagged Album", "title": "Tagged Title"})
    tags.save(tagged)
    make_audio(tree / "Path Artist" / "Path Album" / "Path Title.mp3", 2.0)
    got = _imaker("import", str(tree))
    assert got.returncode == 0, got.stdout + got.stderr
    ingest = _imaker("ingest", "--once")
    assert ingest.returncode == 0, ingest.stdout + ingest.stderr
    titles = set()
    for man_path in s.paths.outputs_dir.glob("*/manifest.json"):
        man = json.loads(man_path.read_text())
        titles.add((man["artist"], man["album"], man["title"]))
    assert titles == {("Tagged Artist", "Tagged Album", "Tagged Title"),
                      ("Path Artist", "Path Album", "Path Title")}
