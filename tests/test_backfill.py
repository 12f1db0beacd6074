"""`imaker backfill` over many tracks: runs of several partitions (Dagster's backfill
policy), nothing separated again, every track checked, and one bad track reported with
its own reason while the other tracks of its run keep their work."""

import math
import shutil

import pytest
from dagster import (AssetRecordsFilter, DagsterEventType, DagsterInstance, DagsterRunStatus,
                     RunsFilter, materialize)
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from conftest import claim_tags, imaker_env_at, stop_separator, write_bundle
from imaker import cli
from imaker.bundle import JobManifest
from imaker.settings import load_settings
from imaker_assets import operations
from imaker_assets.assets import manifest, separation_models, stems, track_assets, variants
from imaker_assets.checks import VARIANT_CHECKS, track_checks
from imaker_assets.partitions import TRACKS_PER_BACKFILL_RUN
from resources import build_resources

TRACKS = [f"bf{i}" for i in range(5)]
TRIGGER = {"imaker/trigger": "imaker-backfill"}


@pytest.fixture(scope="module")
def _ingested(tmp_path_factory, model_repo, source_m4a):
    """Five tracks, each processed by its own one-partition run as the queue sensor's
    (claimed drop, every asset and check), once for the module; kept pristine."""
    from dagster_server import free_port

    root = tmp_path_factory.mktemp("backfill")
    with pytest.MonkeyPatch.context() as mp:
        imaker_env_at(mp, root, model_repo)
        mp.setenv("SEPARATOR_PORT", str(free_port()))
        settings = load_settings()
        instance = DagsterInstance.get()
        for i, job_id in enumerate(TRACKS):
            write_bundle(settings.paths.queue_other, job_id, source_m4a, title=f"Song {i}",
                         source_type="local")
            instance.add_dynamic_partitions("tracks", [job_id])
            result = materialize([*track_assets, *track_checks], partition_key=job_id,
                                 instance=instance, resources=build_resources(settings),
                                 raise_on_error=False, tags=claim_tags(job_id))
            assert result.success
        stop_separator(settings.service.port)
    pristine = root.with_name(root.name + "-pristine")
    shutil.copytree(root, pristine, symlinks=True)
    return root, pristine


@pytest.fixture
def tracks(_ingested, model_repo, monkeypatch):
    """The five tracks as ingested (instance, library, stems, outputs), a private
    separation service for the test."""
    from dagster_server import free_port

    root, pristine = _ingested
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)
    imaker_env_at(monkeypatch, root, model_repo)
    monkeypatch.setenv("SEPARATOR_PORT", str(free_port()))
    settings = load_settings()
    yield settings, DagsterInstance.get()
    stop_separator(settings.service.port)


def _backfill_runs(instance):
    return instance.get_runs(filters=RunsFilter(tags=TRIGGER))


def _stems_state(settings):
    return {p: p.stat().st_mtime_ns for p in settings.paths.stems_dir.rglob("*") if p.is_file()}


def _drums_only(settings, job_id, i):
    return settings.paths.outputs_dir / job_id / "files" / "audio" / f"AC_DC - Song {i} (drums only).m4a"


def test_remix_runs_follow_the_backfill_policy(tmp_path, monkeypatch, model_repo):
    """The runs Dagster's backfill daemon would make for a UI backfill of `variants` +
    `manifest`: ranges of at most TRACKS_PER_BACKFILL_RUN neighbouring partitions."""
    imaker_env_at(monkeypatch, tmp_path, model_repo)
    instance = DagsterInstance.get()
    keys = [f"k{i:02d}" for i in range(20)]
    instance.add_dynamic_partitions("tracks", keys)
    runs = operations.remix_runs(instance, keys)
    assert TRACKS_PER_BACKFILL_RUN == 8
    assert [len(r) for r in runs] == [8, 8, 4] and sum(runs, []) == keys
    # tracks not next to each other in the partition order are never in one range
    picked = keys[:3] + keys[5:7]
    assert operations.remix_runs(instance, picked) == [keys[:3], keys[5:7]]
    assert operations.remix_runs(instance, keys, tracks_per_run=1) == [[k] for k in keys]


def test_backfill_of_many_tracks_runs_ranges_without_separating(tracks, capsys):
    settings, instance = tracks
    before = _stems_state(settings)
    stems_mats = len(instance.fetch_materializations(stems.key, limit=1000).records)
    capsys.readouterr()
    assert cli.main(["backfill", "--variants", "drums_only", "--tracks-per-run", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{j}: {settings.paths.outputs_dir / j}" for j in TRACKS]

    runs = _backfill_runs(instance)
    assert len(runs) == math.ceil(len(TRACKS) / 2) == 3
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
    ranges = {(r.tags.get("dagster/asset_partition_range_start"),
               r.tags.get("dagster/asset_partition_range_end"),
               r.tags.get("dagster/partition")) for r in runs}
    assert ranges == {("bf0", "bf1", None), ("bf2", "bf3", None), (None, None, "bf4")}
    # nothing separated: no stems materialization, no stems file written again
    assert len(instance.fetch_materializations(stems.key, limit=1000).records) == stems_mats
    assert _stems_state(settings) == before
    for i, job_id in enumerate(TRACKS):
        assert _drums_only(settings, job_id, i).is_file()
        man = JobManifest.load(settings.paths.outputs_dir / job_id)
        assert [a.variant for a in man.artifacts] == ["instrumental", "no_drums", "drums_only"]
        # the variants' own metadata per partition, also from a run of two tracks
        mat = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=variants.key, asset_partitions=[job_id]),
            limit=1).records[0]
        meta = mat.asset_materialization.metadata
        assert meta["variants"].value == "instrumental, no_drums, drums_only"
        assert mat.run_id in {r.run_id for r in runs}
        # every check evaluated for this track (its partition) in the backfill run
        for check in [*VARIANT_CHECKS, "manifest_matches_files"]:
            asset = manifest.key if check == "manifest_matches_files" else variants.key
            evals = [e for e in _check_evaluations(instance, mat.run_id)
                     if e.check_name == check and e.partition == job_id]
            assert len(evals) == 1 and evals[0].passed and evals[0].asset_key == asset
            assert evals[0].target_materialization_data is not None
        # Dagster does not see the track as stale after a run of a range
        resolver = get_stale_status_resolver(instance, [*track_assets, separation_models])
        for asset in (variants, manifest):
            assert resolver.get_status(asset.key, job_id) == StaleStatus.FRESH


def test_a_broken_track_fails_alone_with_its_reason(tracks, capsys):
    """bf1's stored stems are corrupted: in the run of bf0..bf2 its variants step fails with
    bf1's reason, bf0 and bf2 still get their new variant file (their manifests wait: Dagster
    records the step for the whole range), and the run of bf3..bf4 is not affected."""
    settings, instance = tracks
    for flac in (settings.paths.stems_dir / "bf1").rglob("*.flac"):
        flac.write_bytes(b"not a flac file" * 64)
    capsys.readouterr()
    assert cli.main(["backfill", "--variants", "drums_only", "--tracks-per-run", "3"]) == 1
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["bf1"].startswith("failed: variants: ") and "flac" in lines["bf1"].lower()
    for job_id in ("bf0", "bf2"):
        assert lines[job_id].startswith("failed: variants: not recorded: bf1 failed in the "
                                        "same run of 3 tracks")
    for job_id in ("bf3", "bf4"):
        assert lines[job_id] == str(settings.paths.outputs_dir / job_id)
    assert len(_backfill_runs(instance)) == 2
    for i, job_id in enumerate(TRACKS):
        assert _drums_only(settings, job_id, i).is_file() == (job_id != "bf1")
        variants_listed = [a.variant for a in JobManifest.load(
            settings.paths.outputs_dir / job_id).artifacts]
        assert ("drums_only" in variants_listed) == (job_id in ("bf3", "bf4"))
    # the run's step failure names the track and its reason (the UI shows it on the step)
    failed = next(r for r in _backfill_runs(instance) if r.status == DagsterRunStatus.FAILURE)
    stage, reason = operations.failure_reason(instance, failed)
    assert stage == "variants" and reason.startswith("1 of 3 tracks failed: bf1: ")


def test_a_range_run_from_the_ui_is_one_run_of_every_asset_of_the_chain(tracks):
    """A UI backfill's run of a range (the backfill daemon's tags), nas_copy included."""
    from imaker_assets.nas import nas_copy

    settings, instance = tracks
    result = materialize([*track_assets, *track_checks, nas_copy], instance=instance,
                         selection=[variants, manifest, nas_copy],
                         resources=build_resources(settings), raise_on_error=False,
                         tags={"dagster/asset_partition_range_start": "bf1",
                               "dagster/asset_partition_range_end": "bf3", **TRIGGER})
    assert result.success
    for asset in ("variants", "manifest", "nas_copy"):
        mats = result.asset_materializations_for_node(asset)
        assert sorted(m.partition for m in mats) == ["bf1", "bf2", "bf3"]
    nas = {m.partition: m.metadata["status"].value
           for m in result.asset_materializations_for_node("nas_copy")}
    assert nas == {"bf1": "skipped", "bf2": "skipped", "bf3": "skipped"}


def _check_evaluations(instance, run_id):
    return [r.event_log_entry.dagster_event.event_specific_data
            for r in instance.get_records_for_run(run_id).records
            if r.event_log_entry.dagster_event is not None
            and r.event_log_entry.dagster_event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION]


def test_a_blocking_check_failing_for_one_track_names_it(tracks, capsys):
    """bf3's stored source says it lasts 5 s longer than its variants: in a run of all five
    tracks its duration check fails (an evaluation on bf3's partition), the others' pass,
    and the blocking check stops the run's manifests."""
    import json

    settings, instance = tracks
    source = settings.paths.library_dir / "bf3" / "source.json"
    meta = json.loads(source.read_text())
    meta["duration_s"] += 5.0
    source.write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli.main(["backfill", "--track", "bf1", "--track", "bf2", "--track", "bf3",
                     "--track", "bf4"]) == 1
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["bf3"].startswith("failed: checks: blocking check failed: "
                                   "variants_match_source_duration: ")
    for job_id in ("bf1", "bf2", "bf4"):
        assert lines[job_id].startswith("failed: checks: not recorded: bf3 failed")
    [run] = _backfill_runs(instance)
    assert (run.tags["dagster/asset_partition_range_start"],
            run.tags["dagster/asset_partition_range_end"]) == ("bf1", "bf4")
    evals = {(e.partition, e.check_name): e.passed
             for e in _check_evaluations(instance, run.run_id)}
    assert evals == {(j, c): not (j == "bf3" and c == "variants_match_source_duration")
                     for j in ("bf1", "bf2", "bf3", "bf4") for c in VARIANT_CHECKS}
