"""Asset checks: pass on a good track, fail on crafted bad ones; metadata users look at."""

import json
import subprocess

import numpy as np
import pytest
from dagster import DagsterInstance

from conftest import claim_tags, write_bundle
from imaker import analysis, audio, pipeline
from imaker.settings import load_settings
from imaker_assets.definitions import build_defs
from imaker_assets.versions import CODE_VERSIONS


@pytest.fixture
def processed(imaker_env, source_m4a, cover_jpg):
    """One track processed through the real ingest_track job (checks included)."""
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "chk", source_m4a, cover=cover_jpg)
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", ["chk"])
    result = build_defs(settings).resolve_job_def("ingest_track").execute_in_process(
        partition_key="chk", instance=instance, tags=claim_tags("chk"))
    return settings, instance, result


def test_checks_pass_on_a_good_track_and_metadata_is_rich(processed):
    settings, instance, result = processed
    evals = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evals == {"variants_match_source_duration": True, "variants_do_not_clip": True,
                     "variants_are_not_silent": True, "manifest_matches_files": True}
    src = result.asset_materializations_for_node("source_audio")[0].metadata
    assert src["waveform"].value.count("data:image/png;base64,") == 1
    assert src["loudness_lufs"].value < 0 and src["true_peak_dbtp"].value <= 0.5
    var = result.asset_materializations_for_node("variants")[0].metadata
    assert var["waveforms"].value.count("data:image/png;base64,") == 2
    per = var["per_variant"].value
    assert set(per) == {"instrumental", "no_drums"} and all(v["bytes"] > 0 for v in per.values())
    # the data version of source_audio is the input hash: the UI's staleness follows the source
    man = json.loads((settings.paths.outputs_dir / "chk" / "manifest.json").read_text())
    assert man["provenance"]["code_versions"] == {
        name: CODE_VERSIONS[name] for name in ("source_audio", "stems", "variants", "manifest")}
    record = instance.get_latest_materialization_event(
        result.asset_materializations_for_node("source_audio")[0].asset_key)
    assert record.asset_materialization.tags["dagster/data_version"] == \
        man["provenance"]["source"]["input_sha256"]
    _a_new_code_version_marks_the_track_stale(instance)


def _a_new_code_version_marks_the_track_stale(instance):
    """What the README promises, through Dagster's staleness resolver (the UI's): the track
    just processed is fresh; with `stems` at a new code version (imaker_assets/versions.py)
    its stems are stale for the code. Dagster 1.13 marks the assets below them stale only
    once the stems are materialized again with a new data version."""
    from dagster._core.definitions.data_version import StaleCauseCategory, StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    from imaker_assets.assets import stems, track_assets

    keys = [a.key for a in track_assets]
    now = get_stale_status_resolver(instance, track_assets)
    assert [now.get_status(k, "chk") for k in keys] == [StaleStatus.FRESH] * 4
    bumped = [a.map_asset_specs(lambda spec: spec.replace_attributes(
        code_version=str(int(spec.code_version) + 1))) if a is stems else a
        for a in track_assets]
    later = get_stale_status_resolver(instance, bumped)
    assert [later.get_status(k, "chk") for k in keys] == \
        [StaleStatus.FRESH, StaleStatus.STALE, StaleStatus.FRESH, StaleStatus.FRESH]
    [cause] = later.get_stale_root_causes(stems.key, "chk")
    assert cause.category == StaleCauseCategory.CODE and cause.asset_key == stems.key


def _ingest(job_id):
    settings = load_settings()
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", [job_id])
    result = build_defs(settings).resolve_job_def("ingest_track").execute_in_process(
        partition_key=job_id, instance=instance, raise_on_error=False, tags=claim_tags(job_id))
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_truncated_variant_and_wrong_hash_fail_their_checks(imaker_env, source_m4a, monkeypatch):
    """Craft bad outputs inside a real run: the variants step's instrumental is cut short,
    and a file is altered after the manifest listed its hash."""
    settings = load_settings()
    real_variants, real_manifest = pipeline.make_variants, pipeline.write_manifest

    def truncating_variants(options, lib, job_id, *extra):
        meta = real_variants(options, lib, job_id, *extra)
        path = lib.output_dir(job_id) / meta["artifacts"][0]["path"]
        cut = path.with_name("cut.m4a")
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-t", "1.5",
                        "-c", "copy", str(cut)], check=True)
        cut.replace(path)
        return meta

    def tampering_manifest(store, lib, job_id, *args, **kw):
        result = real_manifest(store, lib, job_id, *args, **kw)
        with open(lib.output_dir(job_id) / result.artifacts[-1].path, "ab") as fh:
            fh.write(b"tampered")
        return result

    monkeypatch.setattr(pipeline, "make_variants", truncating_variants)
    write_bundle(settings.paths.queue_other, "bad_out", source_m4a)
    evals = _ingest("bad_out")
    assert not evals["variants_match_source_duration"].passed
    assert "instrumental" in evals["variants_match_source_duration"].description
    assert evals["variants_do_not_clip"].passed and evals["variants_are_not_silent"].passed
    # blocking: the manifest never ran, nothing reached done/
    assert "manifest_matches_files" not in evals
    assert not (settings.paths.outputs_dir / "bad_out" / "manifest.json").exists()
    assert not (settings.paths.archive_dir / "done" / "job_bad_out").exists()

    monkeypatch.setattr(pipeline, "make_variants", real_variants)
    monkeypatch.setattr(pipeline, "write_manifest", tampering_manifest)
    write_bundle(settings.paths.queue_other, "bad_hash", source_m4a)
    evals = _ingest("bad_hash")
    assert not evals["manifest_matches_files"].passed
    assert "sha256" in evals["manifest_matches_files"].description


def test_clipped_and_silent_files_fail(tmp_path):
    t = np.arange(44100) / 44100
    loud = np.stack([1.6 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
    audio.encode(loud, 44100, tmp_path / "clip.flac", "flac")  # flac clips at full scale...
    audio.encode(loud, 44100, tmp_path / "clip.m4a", "m4a")    # ...AAC keeps the overshoot
    audio.encode(np.zeros((2, 44100), np.float32), 44100, tmp_path / "quiet.m4a", "m4a")
    arts = [{"kind": "audio", "variant": "instrumental", "path": "clip.m4a"},
            {"kind": "audio", "variant": "no_drums", "path": "quiet.m4a"}]
    no_clip, not_silent = analysis.check_levels(tmp_path, arts)
    assert not no_clip.passed and "instrumental" in no_clip.description
    assert not not_silent.passed and "no_drums" in not_silent.description
    assert analysis.check_durations(tmp_path, arts, 1.0).passed
    assert not analysis.check_durations(tmp_path, arts, 2.0).passed


def test_manifest_check_catches_schema_and_missing_files(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    outcome = analysis.check_manifest(tmp_path)
    assert not outcome.passed and "schema" in outcome.description
