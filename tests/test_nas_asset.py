"""The ``nas_copy`` asset after a real track (real ffmpeg, demucs code, Dagster)."""

import json

import pytest
from dagster import DagsterInstance, RetryPolicy, materialize

from conftest import claim_tags, write_bundle
from imaker.bundle import JobManifest
from imaker.settings import load_settings
from imaker_assets.assets import track_assets
from imaker_assets.nas import NAS_RETRY_POLICY, build_nas_copy, nas_copy
from resources import build_resources

CONFIG = """\
nasSync:
  enabled: true
  remoteRoots:
    audio: "{nas}/Instrumentals"
  routes:
    - match: {{ kind: "audio", variant: "instrumental" }}
      to: "${{remoteRoots.audio}}/Instrumental"
    - match: {{ kind: "audio", variant: "no_drums" }}
      to: "${{remoteRoots.audio}}/NoDrums"
"""


def _materialize(job_id, assets, nas=None, selection=None):
    settings = load_settings()
    settings = settings.replace(nas=nas) if nas else settings
    instance = DagsterInstance.get()
    if not instance.has_dynamic_partition("tracks", job_id):
        instance.add_dynamic_partitions("tracks", [job_id])
    resources = build_resources(settings)
    return materialize(assets, selection=selection, partition_key=job_id, instance=instance,
                       resources=resources, raise_on_error=False,
                       tags=claim_tags(job_id)), settings


def _nas_materialization(result, name="nas_copy"):
    mats = [m for m in result.asset_materializations_for_node(name)]
    assert len(mats) == 1
    return {k: v.value for k, v in mats[0].metadata.items()}


def test_nas_copy_after_a_real_track_then_rerun_copies_nothing(imaker_env, source_m4a, tmp_path,
                                                              monkeypatch):
    nas = tmp_path / "nas"
    (nas / "Instrumentals").mkdir(parents=True)
    cfg = tmp_path / "nas.yaml"
    cfg.write_text(CONFIG.format(nas=nas))
    monkeypatch.setenv("NAS_SYNC_ENABLED", "true")
    monkeypatch.setenv("NAS_SYNC_CONFIG_PATH", str(cfg))
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "nas1", source_m4a)
    result, settings = _materialize("nas1", track_assets + [nas_copy])
    assert result.success
    out = settings.paths.outputs_dir / "nas1"
    man = JobManifest.load(out)
    for art in man.artifacts:
        sub = {"instrumental": "Instrumental", "no_drums": "NoDrums"}[art.variant]
        dest = nas / "Instrumentals" / sub / art.path.split("/")[-1]
        assert dest.read_bytes() == (out / art.path).read_bytes()
    meta = _nas_materialization(result)
    assert meta["status"] == "ok" and meta["copied"] == 2 and meta["failed"] == 0
    assert meta["bytes_sent"] == sum(a.size_bytes for a in man.artifacts)
    assert "| files/audio/AC_DC - Test Song.m4a | copied |" in meta["artifacts"]
    record = json.loads((out / "sync.json").read_text())
    assert [a["status"] for a in record["artifacts"]] == ["copied", "copied"]

    # the asset alone again: nothing is transferred
    again, _ = _materialize("nas1", [nas_copy])
    assert again.success
    meta = _nas_materialization(again)
    assert meta["bytes_sent"] == 0 and meta["unchanged"] == 2 and meta["copied"] == 0


def test_disabled_nas_sync_skips_with_a_warning_and_the_track_completes(imaker_env, source_m4a,
                                                                       monkeypatch):
    monkeypatch.delenv("NAS_SYNC_ENABLED", raising=False)
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "nas2", source_m4a)
    result, settings = _materialize("nas2", track_assets + [nas_copy])
    assert result.success
    meta = _nas_materialization(result)
    assert meta == {"status": "skipped",
                    "reason": "NAS sync is disabled (NAS_SYNC_ENABLED is false)"}
    logs = DagsterInstance.get().all_logs(result.run_id)
    assert any("NAS copy skipped: NAS sync is disabled" in (e.user_message or "") and
               e.level == 30 for e in logs)
    assert (settings.paths.outputs_dir / "nas2" / "manifest.json").is_file()
    assert (settings.paths.archive_dir / "done" / "job_nas2").is_dir()
    assert not (settings.paths.outputs_dir / "nas2" / "sync.json").exists()

    # enabled but no config file: skipped too
    result, _ = _materialize("nas2", [nas_copy],
                             {"enabled": True, "config_path": str(settings.paths.data_dir / "no.yaml")})
    assert result.success
    assert "no config file at" in _nas_materialization(result)["reason"]


def test_unreachable_nas_fails_the_asset_then_a_retry_succeeds(imaker_env, source_m4a, tmp_path):
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "nas3", source_m4a)
    assert _materialize("nas3", track_assets)[0].success
    out = settings.paths.outputs_dir / "nas3"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    nas = tmp_path / "nas"
    cfg = tmp_path / "nas.yaml"
    cfg.write_text(CONFIG.format(nas=nas))
    resource = {"enabled": True, "config_path": str(cfg)}
    quick = build_nas_copy(retry_policy=RetryPolicy(max_retries=1, delay=0.1))
    result, _ = _materialize("nas3", track_assets + [quick], resource, selection=[quick])
    assert not result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1  # the retry policy was applied, then it gave up
    message = str(retries[0].event_specific_data.error.to_string())
    assert f"destination root {nas}/Instrumentals does not exist" in message, message
    assert "is the NAS mounted?" in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in (
        "sync.json", ".sync.lock")} == before  # outputs untouched
    assert json.loads((out / "sync.json").read_text())["status"] == "failed"

    (nas / "Instrumentals").mkdir(parents=True)  # the NAS is back
    result, _ = _materialize("nas3", track_assets + [quick], resource, selection=[quick])
    assert result.success
    assert _nas_materialization(result)["copied"] == 2


def test_nas_copy_definition():
    assert nas_copy.op.retry_policy == NAS_RETRY_POLICY
    assert NAS_RETRY_POLICY.max_retries >= 1 and NAS_RETRY_POLICY.backoff is not None
    spec = nas_copy.specs_by_key[nas_copy.key]
    assert [d.asset_key.path for d in spec.deps] == [["manifest"]]
    assert nas_copy.partitions_def.name == "tracks"
    assert nas_copy.group_names_by_key[nas_copy.key] == "tracks"
    assert set(nas_copy.required_resource_keys) - {"io_manager"} == {"settings"}


def test_invalid_config_fails_without_retry(imaker_env, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("nasSync:\n  routes:\n    - match: {kind: audio}\n")
    settings = load_settings()
    out = settings.paths.outputs_dir / "cfg1"
    out.mkdir(parents=True)
    result, _ = _materialize("cfg1", track_assets + [nas_copy],
                             {"enabled": True, "config_path": str(cfg)}, selection=[nas_copy])
    assert not result.success
    failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][-1]
    assert "nasSync.routes[0].to: route has no 'to' destination" in \
        failure.event_specific_data.error.message
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
