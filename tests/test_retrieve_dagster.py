"""The Dagster `retrieve` job writes bundles that the queue sensor picks up, and a
retrieved bundle goes all the way to outputs (retrieve -> sensor -> ingest)."""

from __future__ import annotations

import json

from dagster import DagsterInstance, Definitions, build_sensor_context

from imaker.settings import load_settings
from imaker_assets.retrieve import retrieve
from resources import build_resources
from test_retrieve_support import bundles, media_server, retr_env  # noqa: F401


def _config(**cfg):
    return {"ops": {"retrieve_bundles": {"config": cfg}}}


def test_retrieve_job_then_sensor_then_outputs(retr_env, media_server):
    from imaker_assets.definitions import build_defs
    from sensors import queue_sensor

    s = load_settings()
    instance = DagsterInstance.get()
    defs = build_defs(s)
    job_def = Definitions(jobs=[retrieve], resources=build_resources(s)).resolve_job_def("retrieve")
    result = job_def.execute_in_process(
        run_config=_config(source="youtube", urls=[media_server.url("song.m4a")], mode="audio"),
        instance=instance)
    assert result.success
    rows = result.output_for_node("retrieve_bundles")
    assert [r["status"] for r in rows] == ["queued"]
    job_id = rows[0]["job_id"]
    assert bundles(s.paths.queue_youtube_audio) == [f"job_{job_id}"]
    data = json.loads((s.paths.queue_youtube_audio / f"job_{job_id}" / "job.json").read_text())
    assert data["retriever"]["dagster_run_id"] == result.run_id

    ctx = build_sensor_context(instance=instance, definitions=defs, resources=build_resources(s))
    tick = queue_sensor(ctx)
    assert [r.partition_key for r in tick.run_requests] == [job_id]

    # what the sensor's run request does: add the partition, run ingest_track for it
    for req in tick.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    run = defs.resolve_job_def("ingest_track").execute_in_process(
        partition_key=job_id, instance=instance, tags=tick.run_requests[0].tags)
    assert run.success
    manifest = json.loads((s.paths.outputs_dir / job_id / "manifest.json").read_text())
    assert manifest["source_type"] == "youtube" and manifest["album"] == "YTDL"
    assert manifest["provenance"]["source"]["url"] == media_server.url("song.m4a")


def test_retrieve_job_fails_when_a_url_fails_but_keeps_the_good_ones(retr_env, media_server):
    s = load_settings()
    job_def = Definitions(jobs=[retrieve], resources=build_resources(s)).resolve_job_def("retrieve")
    result = job_def.execute_in_process(
        run_config=_config(urls=[media_server.url("missing.m4a"), media_server.url("other.m4a")]),
        instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert "1 of 2 target(s)" in failure.message or "404" in str(failure.event_specific_data)
    assert len(bundles(s.paths.queue_youtube_audio)) == 1
