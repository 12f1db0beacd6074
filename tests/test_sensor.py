"""The queue sensor evaluated with build_sensor_context on a temp instance: it claims
bundles, requests one run per drop and settles drops by their runs' status."""

import json

from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context

from conftest import write_bundle
from imaker.queues import QueueStore
from imaker.settings import load_settings
from imaker_assets.definitions import build_defs
from resources import build_resources
from sensors import queue_sensor


def _tick(instance, defs):
    ctx = build_sensor_context(instance=instance, definitions=defs,
                               resources=build_resources(load_settings()))
    return queue_sensor(ctx)


def _apply(instance, result):
    """Do what the daemon does with the partition requests."""
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def _execute(instance, defs, req):
    """Run a requested run in-process (what the run queue + launcher do)."""
    return defs.resolve_job_def(req.job_name).execute_in_process(
        partition_key=req.partition_key, tags=req.tags, instance=instance,
        raise_on_error=False)


def test_new_bundle_is_claimed_and_gets_one_run_tmp_ignored(imaker_env, source_m4a):
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    store = QueueStore.from_settings(settings)
    write_bundle(settings.paths.queue_youtube_audio, "yt_1", source_m4a)
    (settings.paths.queue_youtube_audio / "job_yt_2.tmp").mkdir()   # still being written

    result = _tick(instance, defs)
    assert isinstance(result, SensorResult)
    [req] = result.run_requests
    claim = store.read_claim("yt_1")
    assert claim.queue == "youtube_audio"
    assert req.partition_key == "yt_1" and req.run_key == claim.drop_id
    assert req.tags["imaker/drop_id"] == claim.drop_id
    assert req.tags["imaker/source_type"] == "youtube"
    assert req.tags["dagster/max_retries"] == "2"   # MAX_CLAIM_ATTEMPTS = 3 runs in all
    [add] = result.dynamic_partitions_requests
    assert add.partitions_def_name == "tracks" and list(add.partition_keys) == ["yt_1"]
    _apply(instance, result)
    assert (settings.paths.queue_youtube_audio / "job_yt_2.tmp").is_dir()  # untouched

    # the daemon died before creating the run: the next tick asks again with the same run
    # key (Dagster creates a run key once), never for a second drop
    again = _tick(instance, defs)
    assert [r.run_key for r in again.run_requests] == [req.run_key]

    assert _execute(instance, defs, req).success
    assert store.settled("yt_1", claim.drop_id)[0] == "done"
    assert isinstance(_tick(instance, defs), SkipReason)

    # dropped again later: a new drop, a new run key; the partition is not added twice
    write_bundle(settings.paths.queue_youtube_audio, "yt_1", source_m4a)
    third = _tick(instance, defs)
    [req3] = third.run_requests
    assert req3.run_key != req.run_key and third.dynamic_partitions_requests == []


def test_bounded_per_tick_in_arrival_order(imaker_env, source_m4a, monkeypatch):
    monkeypatch.setenv("SENSOR_MAX_JOBS_PER_TICK", "2")
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    assert isinstance(_tick(instance, defs), SkipReason)
    for i in range(5):
        write_bundle(settings.paths.queue_other, f"b{i}", source_m4a)
    store = QueueStore.from_settings(settings)
    claimed = []
    for expected in (2, 4, 5):
        _tick(instance, defs)
        now = sorted(c.job_id for c in store.claims())
        assert len(now) == expected
        claimed += [j for j in now if j not in claimed]
    assert claimed == [f"b{i}" for i in range(5)]       # FIFO, each claimed once


def test_invalid_folder_is_rejected_to_failed(imaker_env, source_m4a):
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    settings.paths.queue_other.mkdir(parents=True)
    (settings.paths.queue_other / "job_a|b").mkdir()
    result = _tick(instance, defs)
    assert isinstance(result, SkipReason)
    error = json.loads((settings.paths.archive_dir / "failed" / "job_a_b" / "error.json").read_text())
    assert "job_<id>" in error["error"] and error["stage"] == "queue"


def test_a_fifo_job_json_fails_at_once_without_blocking_the_tick(imaker_env, source_m4a):
    import os
    import time

    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    folder = write_bundle(settings.paths.queue_other, "fifo1", source_m4a)
    (folder / "job.json").unlink()
    os.mkfifo(folder / "job.json")
    start = time.monotonic()
    [req] = _tick(instance, defs).run_requests   # the sensor peeks at job.json: no hang
    _apply(instance, _tick(instance, defs))
    result = _execute(instance, defs, req)
    assert not result.success and time.monotonic() - start < 60
    error = json.loads((settings.paths.archive_dir / "failed" / "job_fifo1" / "error.json").read_text())
    assert error["stage"] == "source_audio" and "not a regular file" in error["error"]


def test_a_drop_whose_last_run_died_goes_to_failed_with_the_reason(imaker_env, source_m4a):
    """A run that Dagster marked failed (its worker died) is left alone while Dagster will
    retry it; once no retry is left, the sensor archives the drop to failed/."""
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    store = QueueStore.from_settings(settings)
    write_bundle(settings.paths.queue_other, "dies", source_m4a)
    result = _tick(instance, defs)
    _apply(instance, result)
    [req] = result.run_requests
    job = defs.resolve_job_def("ingest_track")

    def dead_run(max_retries):
        run = instance.create_run_for_job(
            job, tags={**req.tags, "dagster/partition": "dies",
                       "dagster/max_retries": str(max_retries)})
        instance.report_run_failed(run, "Run worker died: exit code -9")
        return instance.get_run_by_id(run.run_id)

    first = dead_run(max_retries=2)
    assert first.tags["dagster/will_retry"] == "true"
    assert isinstance(_tick(instance, defs), SkipReason)          # waits for the retry
    assert store.read_claim("dies").drop_id == req.tags["imaker/drop_id"]

    last = dead_run(max_retries=0)
    assert last.tags["dagster/will_retry"] == "false"
    _tick(instance, defs)
    error = json.loads((store.failed_dir / "job_dies" / "error.json").read_text())
    assert error["stage"] == "run" and "exit code -9" in error["error"]
    assert "after 2 attempts" in error["error"]
    assert list(settings.paths.working_dir.iterdir()) == []


def test_a_failed_blocking_check_keeps_the_track_out_of_done_with_its_reason(
        imaker_env, source_m4a, monkeypatch):
    """A silent result (the variants step leaves a silent instrumental of the right length):
    the blocking check on `variants` fails, `manifest` never runs, and the sensor archives
    the bundle to failed/ with the check's description."""
    import numpy as np

    from imaker import audio, pipeline

    real_variants = pipeline.make_variants

    def silencing_variants(options, lib, job_id, *extra):
        meta = real_variants(options, lib, job_id, *extra)
        path = lib.output_dir(job_id) / meta["artifacts"][0]["path"]
        frames = audio.decode(path, 44100, 2).shape[1]
        audio.encode(np.zeros((2, frames), np.float32), 44100, path, "m4a")
        return meta

    monkeypatch.setattr(pipeline, "make_variants", silencing_variants)
    settings = load_settings()
    defs = build_defs(settings)
    instance = DagsterInstance.get()
    write_bundle(settings.paths.queue_other, "quiet", source_m4a)
    result = _tick(instance, defs)
    _apply(instance, result)
    run = _execute(instance, defs, result.run_requests[0])
    assert not run.success
    assert not (settings.paths.outputs_dir / "quiet" / "manifest.json").exists()
    _tick(instance, defs)
    error = json.loads((settings.paths.archive_dir / "failed" / "job_quiet" / "error.json").read_text())
    assert error["stage"] == "checks"
    assert "variants_are_not_silent" in error["error"] and "silent" in error["error"]
    assert not (settings.paths.archive_dir / "done" / "job_quiet").exists()
