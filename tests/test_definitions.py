"""The code location loads the way `dagster dev` loads it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_dagster_definitions_validate_workspace(imaker_env):
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run([str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "instrumental_maker" in proc.stdout + proc.stderr


def test_definitions_contents(imaker_env):
    from imaker_assets.definitions import build_defs

    defs = build_defs()
    job = defs.resolve_job_def("ingest_track")
    assert job.partitions_def.name == "tracks"
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"source_audio", "stems", "variants", "manifest", "nas_copy", "catalog",
                    "separation_models"}
    sensors = {s.name for s in defs.sensors}
    # no notification sensors without NOTIFY_URLS (they would tick every 5 s to send nothing)
    assert sensors == {"queue_sensor", "catalog_automation", "models_sensor"}
    from imaker_assets.assets import stems

    assert stems.op.pool == "gpu"
    assert {j.name for j in defs.resolve_sensor_def("queue_sensor").jobs} == {"ingest_track"}
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"ingest_track", "retrieve"}
    assert "ingest_batch" not in {j.name for j in defs.resolve_all_job_defs()}


def test_ingest_only_daemon_has_the_queue_and_notification_sensors(imaker_env, monkeypatch):
    """The daemon `imaker ingest --once` starts (IMAKER_INGEST_ONLY=1) notifies too; the
    notification sensors exist where NOTIFY_URLS is set."""
    from dagster import DagsterRunStatus, DefaultSensorStatus

    from imaker_assets.definitions import build_defs

    monkeypatch.setenv("IMAKER_INGEST_ONLY", "1")
    assert {s.name for s in build_defs().sensors} == {"queue_sensor"}  # NOTIFY_URLS unset
    monkeypatch.setenv("NOTIFY_URLS", "json://127.0.0.1:9/hook")
    defs = build_defs()
    assert {s.name for s in defs.sensors} == {"queue_sensor", "notify_done", "notify_failed",
                                             "notify_canceled"}
    monkeypatch.delenv("IMAKER_INGEST_ONLY")
    assert {s.name for s in build_defs().sensors} == {
        "queue_sensor", "notify_done", "notify_failed", "notify_canceled", "catalog_automation",
        "models_sensor"}
    for name, status in (("notify_done", DagsterRunStatus.SUCCESS),
                         ("notify_failed", DagsterRunStatus.FAILURE),
                         ("notify_canceled", DagsterRunStatus.CANCELED)):
        sensor = defs.resolve_sensor_def(name)
        assert sensor.default_status == DefaultSensorStatus.RUNNING
        assert sensor._run_status == status   # no public accessor in Dagster 1.13
        assert [j.name for j in sensor._monitored_jobs] == ["ingest_track"]


def test_every_asset_takes_its_code_version_from_the_one_table(imaker_env):
    """imaker_assets/versions.py declares the code version of every asset."""
    from imaker_assets.definitions import build_defs
    from imaker_assets.versions import CODE_VERSIONS

    graph = build_defs().resolve_asset_graph()
    versions = {k.to_user_string(): graph.get(k).code_version
                for k in graph.get_all_asset_keys() if graph.get(k).is_materializable}
    assert versions == CODE_VERSIONS
