"""Batch ingestion (`imaker ingest --once` with worker processes): every track keeps its own
run and partition, the work is spread over long-lived workers, and a bad track fails alone."""

from __future__ import annotations

import io
import os

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

from conftest import make_audio, write_bundle
from imaker.settings import load_settings
from imaker_assets import operations


def test_worker_count_follows_the_setting_and_the_backlog(monkeypatch):
    s = load_settings({"INGEST_WORKERS": "3"})
    assert operations.worker_count(s, 10) == 3
    assert operations.worker_count(s, 2) == 2  # never more workers than tracks
    assert operations.worker_count(load_settings({"INGEST_WORKERS": "1"}), 10) == 1
    auto = load_settings({})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert operations.worker_count(auto, 5) == 2 and operations.worker_count(auto, 1) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert operations.worker_count(auto, 5) == 1


def test_two_workers_share_the_batch_and_a_bad_track_fails_alone(imaker_env, source_m4a,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("INGEST_WORKERS", "2")
    s = load_settings()
    for i in range(3):
        write_bundle(s.queue_other, f"good_{i}", source_m4a, title=f"Song {i}")
    bad = tmp_path / "bad.m4a"
    bad.write_bytes(make_audio(tmp_path / "ok.m4a", 2.0).read_bytes()[:3000])  # truncated
    write_bundle(s.queue_other, "broken", bad)
    instance = DagsterInstance.get()
    out = io.StringIO()

    assert operations.ingest_once(instance, s, out) == 1
    lines = dict(line.split(": ", 1) for line in out.getvalue().strip().splitlines())
    for i in range(3):
        assert lines[f"good_{i}"] == str(s.outputs_dir / f"good_{i}")
        assert (s.outputs_dir / f"good_{i}" / "manifest.json").is_file()
    assert lines["broken"].startswith("failed: source_audio: ")
    assert sorted(p.name for p in (s.archive_dir / "done").iterdir()) == [
        "job_good_0", "job_good_1", "job_good_2"]
    assert [p.name for p in (s.archive_dir / "failed").iterdir()] == ["job_broken"]
    assert list(s.working_dir.iterdir()) == []

    runs = {r.dagster_run.tags["dagster/partition"]: r.dagster_run
            for r in instance.get_run_records() if r.dagster_run.job_name == "ingest_track"}
    assert set(runs) == {"good_0", "good_1", "good_2", "broken"}  # one run per track
    assert runs["broken"].status == DagsterRunStatus.FAILURE
    pids = set()
    for key in ("good_0", "good_1", "good_2"):
        assert runs[key].status == DagsterRunStatus.SUCCESS
    for key in runs:
        starts = instance.get_records_for_run(
            runs[key].run_id, of_type=DagsterEventType.RUN_START).records
        pids.add(starts[0].event_log_entry.dagster_event.pid)
    # the runs executed in worker processes, not in this one, and both workers took tracks
    assert os.getpid() not in pids and len(pids) == 2
