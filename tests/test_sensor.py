"""The queue sensor evaluated with build_sensor_context on a temp instance."""

import json

from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context

from conftest import write_bundle
from imaker.settings import load_settings
from imaker_assets.definitions import build_defs
from resources import build_resources
from sensors import queue_sensor


def _tick(instance, defs, cursor=None):
    ctx = build_sensor_context(instance=instance, definitions=defs, cursor=cursor,
                               resources=build_resources(load_settings()))
    return queue_sensor(ctx)


def _apply(instance, result):
    """Do what the daemon does with the partition requests."""
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def test_new_bundle_adds_partition_and_requests_run_tmp_ignored(imaker_env, source_m4a):
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    write_bundle(settings.queue_youtube_audio, "yt_1", source_m4a)
    (settings.queue_youtube_audio / "job_yt_2.tmp").mkdir()   # still being written

    result = _tick(instance, defs)
    assert isinstance(result, SensorResult)
    [req] = result.run_requests
    assert req.partition_key == "yt_1" and req.run_key == "yt_1"
    assert req.tags["imaker/queue"] == "youtube_audio"
    assert req.tags["imaker/source_type"] == "youtube"
    [add] = result.dynamic_partitions_requests
    assert add.partitions_def_name == "tracks" and list(add.partition_keys) == ["yt_1"]
    _apply(instance, result)

    # second tick: nothing new (the run has not claimed the bundle yet)
    again = _tick(instance, defs, cursor=result.cursor)
    assert isinstance(again, SkipReason)

    # the retriever finishes the .tmp bundle: only it is requested, in its own queue
    tmp = settings.queue_youtube_audio / "job_yt_2.tmp"
    tmp.rmdir()
    write_bundle(settings.queue_youtube_video, "yt_2", source_m4a)
    third = _tick(instance, defs, cursor=result.cursor)
    assert [r.partition_key for r in third.run_requests] == ["yt_2"]
    assert third.run_requests[0].tags["imaker/queue"] == "youtube_video"
    assert list(third.dynamic_partitions_requests[0].partition_keys) == ["yt_2"]


def test_idle_sensor_skips_and_bounded_per_tick(imaker_env, source_m4a, monkeypatch):
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    assert isinstance(_tick(instance, defs), SkipReason)
    monkeypatch.setenv("SENSOR_MAX_JOBS_PER_TICK", "2")
    monkeypatch.setenv("SENSOR_BATCH_MIN", "0")  # one run per bundle
    for i in range(5):
        write_bundle(settings.queue_other, f"b{i}", source_m4a)
    cursor, seen = None, []
    for _ in range(3):
        result = _tick(instance, defs, cursor)
        assert len(result.run_requests) <= 2
        seen += [r.partition_key for r in result.run_requests]
        _apply(instance, result)
        cursor = result.cursor
    assert seen == [f"b{i}" for i in range(5)]          # FIFO, each exactly once
    assert isinstance(_tick(instance, defs, cursor), SkipReason)


def test_known_partition_is_not_added_twice_and_resubmission_gets_new_run_key(imaker_env, source_m4a):
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", ["old"])
    (settings.archive_dir / "done" / "job_old").mkdir(parents=True)  # processed before
    write_bundle(settings.queue_other, "old", source_m4a)
    result = _tick(instance, defs)
    assert result.dynamic_partitions_requests == []
    assert result.run_requests[0].run_key == "old:1"


def test_invalid_folder_is_rejected_to_failed(imaker_env, source_m4a):
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    settings.queue_other.mkdir(parents=True)
    (settings.queue_other / "job_a|b").mkdir()
    result = _tick(instance, defs)
    assert isinstance(result, SkipReason)
    error = json.loads((settings.archive_dir / "failed" / "job_a_b" / "error.json").read_text())
    assert "job_<id>" in error["error"] and error["stage"] == "queue"


def test_several_new_bundles_become_one_batch_run_with_per_track_runs_inside(
        imaker_env, source_m4a, tmp_path, monkeypatch):
    """A tick with >= SENSOR_BATCH_MIN new bundles requests one ingest_batch run; executing
    it runs every track as its own ingest_track run (tagged with the batch run), and a bad
    track fails alone without failing the batch or its batch-mates."""
    from dagster import DagsterRunStatus

    monkeypatch.setenv("INGEST_WORKERS", "2")
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    write_bundle(settings.queue_other, "s1", source_m4a)
    write_bundle(settings.queue_youtube_audio, "s2", source_m4a)
    junk = tmp_path / "junk.m4a"
    junk.write_bytes(b"\0" * 5000)
    write_bundle(settings.queue_other, "s3", junk)

    result = _tick(instance, defs)
    [req] = result.run_requests
    assert req.job_name == "ingest_batch" and req.partition_key is None
    config = req.run_config["ops"]["ingest_tracks"]["config"]
    assert sorted(zip(config["job_ids"], config["queues"])) == [
        ("s1", "other"), ("s2", "youtube_audio"), ("s3", "other")]
    assert sorted(result.dynamic_partitions_requests[0].partition_keys) == ["s1", "s2", "s3"]
    _apply(instance, result)
    assert isinstance(_tick(instance, defs, cursor=result.cursor), SkipReason)
    again = _tick(instance, defs)  # same bundles without the cursor: same run key (deduped)
    assert again.run_requests[0].run_key == req.run_key

    batch = defs.resolve_job_def("ingest_batch").execute_in_process(
        run_config=req.run_config, instance=instance, tags=req.tags)
    assert batch.success
    summary = batch.output_for_node("ingest_tracks")
    assert summary == 2
    runs = {r.dagster_run.tags["dagster/partition"]: r.dagster_run
            for r in instance.get_run_records() if r.dagster_run.job_name == "ingest_track"}
    assert set(runs) == {"s1", "s2", "s3"}
    assert all(r.tags["imaker/batch_run_id"] == batch.run_id for r in runs.values())
    assert runs["s1"].status == runs["s2"].status == DagsterRunStatus.SUCCESS
    assert runs["s3"].status == DagsterRunStatus.FAILURE
    for key in ("s1", "s2"):
        assert (settings.outputs_dir / key / "manifest.json").is_file()
    assert (settings.archive_dir / "failed" / "job_s3" / "error.json").is_file()
