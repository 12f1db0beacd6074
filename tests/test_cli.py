"""`imaker ingest --once` end to end, as a user runs it (a real subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import JUNK_AUDIO, write_bundle
from imaker.settings import load_settings

ROOT = Path(__file__).parents[1]


def _imaker(*args, env=None):
    exe = Path(sys.executable).with_name("imaker")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "imaker.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_ingest_once_processes_good_and_fails_hostile_without_losing_anything(
        imaker_env, source_m4a, cover_jpg, tmp_path):
    s = load_settings()
    write_bundle(s.paths.queue_youtube_audio, "good_1", source_m4a, cover=cover_jpg)
    write_bundle(s.paths.queue_other, "good_2", source_m4a, artist="Ünïcode Artist", title="Song: Part 2?")
    write_bundle(s.paths.queue_other, "bad_json", source_m4a, _raw="{oops")
    write_bundle(s.paths.queue_other, "bad_path", source_m4a, audio="../../../etc/passwd")
    write_bundle(s.paths.queue_youtube_video, "bad_missing", None)
    junk = tmp_path / "junk.m4a"
    junk.write_bytes(JUNK_AUDIO)
    write_bundle(s.paths.queue_other, "bad_audio", junk)
    write_bundle(s.paths.queue_other, "bad_version", source_m4a, schema_version=7)
    write_bundle(s.paths.queue_other, "bad_huge", source_m4a, artist="A" * 50_000)
    link = write_bundle(s.paths.queue_other, "bad_link", None, audio="x.m4a")
    os.symlink("/etc/hostname", link / "x.m4a")
    (s.paths.queue_other / "job_still_writing.tmp").mkdir()
    (s.paths.queue_other / "job_bad id!").mkdir()
    silent = tmp_path / "silent.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "anullsrc=r=44100:cl=stereo", "-t", "3", str(silent)], check=True)
    write_bundle(s.paths.queue_other, "bad_silent", silent)
    # a variant cut short inside the real run (tests/faults/sitecustomize.py): the blocking
    # duration check fails the track
    write_bundle(s.paths.queue_other, "bad_truncated", source_m4a)
    faults = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "faults"),
                                                           os.environ.get("PYTHONPATH")])),
              "IMAKER_FAULT_TRUNCATE_JOB": "bad_truncated"}

    proc = _imaker("ingest", "--once", env=faults)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["good_1"] == str(s.paths.outputs_dir / "good_1")
    assert lines["good_2"] == str(s.paths.outputs_dir / "good_2")
    assert lines["bad_json"].startswith("failed: source_audio: job.json is not valid JSON")
    assert lines["bad_path"].startswith("failed: ") and "'..'" in lines["bad_path"]
    assert "does not exist" in lines["bad_missing"]
    assert "cannot read audio.m4a" in lines["bad_audio"]
    assert lines["job_bad id!"].startswith("failed: folder name")
    assert "unknown schema_version 7" in lines["bad_version"]
    assert "artist" in lines["bad_huge"] and len(lines["bad_huge"]) < 1000
    assert "outside the bundle" in lines["bad_link"]
    assert lines["bad_silent"].startswith("failed: source_audio: the source is silent: ")
    assert lines["bad_truncated"].startswith("failed: checks: ")
    assert "variants_match_source_duration" in lines["bad_truncated"]
    assert "instrumental" in lines["bad_truncated"]

    done = sorted(p.name for p in (s.paths.archive_dir / "done").iterdir())
    failed = sorted(p.name for p in (s.paths.archive_dir / "failed").iterdir())
    assert done == ["job_good_1", "job_good_2"]
    assert failed == ["job_bad_audio", "job_bad_huge", "job_bad_id_", "job_bad_json", "job_bad_link",
                      "job_bad_missing", "job_bad_path", "job_bad_silent", "job_bad_truncated",
                      "job_bad_version"]
    for name in failed:
        error = json.loads((s.paths.archive_dir / "failed" / name / "error.json").read_text())
        assert error["error"] and error["at"] and "stage" in error
    assert (s.paths.outputs_dir / "good_2" / "files" / "audio" / "Ünïcode Artist - Song_ Part 2_.m4a").is_file()
    assert json.loads((s.paths.outputs_dir / "good_1" / "manifest.json").read_text())["job_id"] == "good_1"
    # the .tmp bundle is untouched; nothing is left claimed
    assert [p.name for p in s.paths.queue_other.iterdir()] == ["job_still_writing.tmp"]
    assert list(s.paths.working_dir.iterdir()) == []

    # the runs and partitions are in $DAGSTER_HOME's instance
    from dagster import DagsterInstance

    instance = DagsterInstance.get()
    assert {"good_1", "good_2", "bad_json"} <= set(instance.get_dynamic_partitions("tracks"))

    again = _imaker("ingest", "--once")
    assert again.returncode == 0 and "no bundles waiting" in again.stdout


def test_commands_started_together_on_a_new_instance_all_work(imaker_env):
    """Dagster creates a new sqlite instance's databases in the first process that opens
    it; two at once could stamp its schedule storage twice and break the instance for good
    ("alembic_version has more than one head", dagster-io/dagster#27390). Six `imaker`
    commands started together on a new DAGSTER_HOME all work, and so does the next one."""
    exe = Path(sys.executable).with_name("imaker")
    procs = [subprocess.Popen([str(exe), "ingest", "--once"], cwd=ROOT, env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outs = [(p.communicate(timeout=300), p.returncode) for p in procs]
    assert all(rc == 0 for _, rc in outs), outs
    assert all(out.startswith("no bundles waiting") for (out, _), _ in outs), outs
    home = Path(os.environ["DAGSTER_HOME"])
    import sqlite3

    for name in ("schedules/schedules.db", "history/runs.db", "history/runs/index.db"):
        with sqlite3.connect(home / name) as db:
            assert len(db.execute("select * from alembic_version").fetchall()) == 1, name
    proc = _imaker("ingest", "--once")
    assert proc.returncode == 0, proc.stdout + proc.stderr
