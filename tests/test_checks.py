"""Asset checks: pass on a good track, fail on crafted bad ones; metadata users look at."""

import json
import subprocess

import numpy as np
import pytest
from dagster import DagsterInstance

from conftest import claim_tags, write_bundle
from imaker import analysis, audio, pipeline
from imaker.fsutil import sha256_file
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
    assert src["loudness_lufs"].value < 0 and src["peak_dbfs"].value <= 0.0
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


class _Reads:
    """Who reads the watched files, in this process: Python opens for reading and the
    subprocesses (ffmpeg, ffprobe) whose arguments name one, each while the file exists
    under its final name (the encoders write under a temporary one)."""

    def __init__(self, monkeypatch):
        import builtins
        import io
        import os

        self.watched: set[str] = set()
        self.log: list[tuple[str, str]] = []  # (path, what read it)
        real_open, real_os_open = builtins.open, os.open
        real_popen_init = subprocess.Popen.__init__

        def hit(path) -> str | None:
            if isinstance(path, int):
                return None
            try:
                name = os.path.abspath(os.fsdecode(path))
            except TypeError:
                return None
            return name if name in self.watched and os.path.exists(name) else None

        def counting_open(file, mode="r", *args, **kwargs):
            name = hit(file)
            if name and ("r" in mode or "+" in mode):
                self.log.append((name, f"open({mode!r})"))
            return real_open(file, mode, *args, **kwargs)

        def counting_os_open(path, flags, *args, **kwargs):
            name = hit(path)
            if name and flags & os.O_ACCMODE in (os.O_RDONLY, os.O_RDWR):
                self.log.append((name, "os.open"))
            return real_os_open(path, flags, *args, **kwargs)

        def counting_popen_init(popen, args, *rest, **kwargs):
            argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
            tool = os.path.basename(os.fsdecode(argv[0]))
            for arg in argv[1:]:
                for name in self.watched:
                    if name in os.fsdecode(arg) and os.path.exists(name):
                        self.log.append((name, tool))
            return real_popen_init(popen, args, *rest, **kwargs)

        monkeypatch.setattr(builtins, "open", counting_open)
        monkeypatch.setattr(io, "open", counting_open)
        monkeypatch.setattr(os, "open", counting_os_open)
        monkeypatch.setattr(subprocess.Popen, "__init__", counting_popen_init)

    def of(self, path) -> list[str]:
        return [what for name, what in self.log if name == str(path)]


def test_each_variant_is_read_back_once_after_it_is_written(imaker_env, source_m4a, cover_jpg,
                                                            monkeypatch):
    """Issue 22: measured while encoded, every published variant is read back exactly once
    in the whole run (by the one decode of the blocking checks: no ffprobe, no loudness or
    waveform decode, no hash by the manifest), and the stored source is not decoded again
    after it is written (its loudness and picture come from its encoding; the separation
    service reads it in its own process)."""
    monkeypatch.setenv("GENERATE_DRUMS_ONLY_VARIANT", "true")
    settings = load_settings()
    out = settings.paths.outputs_dir / "once"
    names = {"instrumental": "", "no_drums": " (no drum)", "drums_only": " (drums only)"}
    variant_files = {v: out / "files" / "audio" / f"AC_DC - Test Song{suffix}.m4a"
                     for v, suffix in names.items()}
    source = settings.paths.library_dir / "once" / "source.flac"
    reads = _Reads(monkeypatch)
    reads.watched = {str(p) for p in [*variant_files.values(), source]}
    write_bundle(settings.paths.queue_other, "once", source_m4a, cover=cover_jpg)
    evals = _ingest("once")
    monkeypatch.undo()
    assert {name: e.passed for name, e in evals.items()} == {
        "variants_match_source_duration": True, "variants_do_not_clip": True,
        "variants_are_not_silent": True, "manifest_matches_files": True}
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(out / a["path"] for a in man["artifacts"]) == sorted(variant_files.values())
    for variant, path in variant_files.items():
        assert reads.of(path) == ["ffmpeg"], (variant, reads.of(path))  # the checks' decode
    assert reads.of(source) == []
    # the manifest took the measurements of the encoding: they are the files'
    source_s = json.loads(source.with_name("source.json").read_text())["duration_s"]
    for art in man["artifacts"]:
        path = out / art["path"]
        assert art["sha256"] == sha256_file(path) and art["size_bytes"] == path.stat().st_size
        assert abs(art["duration_s"] - source_s) <= 0.001 and art["codec"] == "aac"
        assert (art["sample_rate"], art["channels"]) == (44100, 2)


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
    checks = analysis.check_variants(tmp_path, arts, 1.0)
    no_clip, not_silent = checks["clipping"], checks["silence"]
    assert not no_clip.passed and "instrumental" in no_clip.description
    assert no_clip.severity == "error"  # no record of the PCM sent: the decode decides
    assert "no_drums" not in no_clip.description
    assert not not_silent.passed and "no_drums" in not_silent.description
    assert "instrumental" not in not_silent.description
    assert checks["duration"].passed
    assert not analysis.check_variants(tmp_path, arts, 2.0)["duration"].passed


def test_clipping_is_measured_on_the_published_file_not_the_pcm(tmp_path):
    """AAC decoding overshoots full scale where the PCM sent to the encoder did not: the
    encoder's own numbers say no clipping, the check (a decode of the file) says clipping."""
    t = np.arange(2 * 44100) / 44100
    square = np.sign(np.sin(2 * np.pi * 100 * t)) * 0.999  # sample peak just under 0 dBFS
    wav = np.stack([square, square]).astype(np.float32)
    with audio.Encoder(tmp_path / "sq.m4a", 44100, 2, "m4a", measure=True, digest=True) as enc:
        enc.write(wav)
    record = {"kind": "audio", "variant": "instrumental", "path": "sq.m4a",
              **enc.measurements()}
    assert record["peak_dbfs"] <= 0.0  # what was sent
    outcome = analysis.check_variants(tmp_path, [record], 2.0)["clipping"]
    assert not outcome.passed and "instrumental" in outcome.description
    assert outcome.details["levels"]["instrumental"]["peak_dbfs"] > 0.0
    # the mix did not clip: a lossy codec's overshoot, a warning that does not stop the track
    assert outcome.severity == "warn" and outcome.description.startswith("lossy overshoot")
    # a mix that went over full scale is clipping even where the decode stays at 0 dBFS
    # (FLAC stores full scale at most)
    loud = np.stack([1.3 * np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
    with audio.Encoder(tmp_path / "hot.flac", 44100, 2, "flac", measure=True) as enc:
        enc.write(loud)
    hot = {"kind": "audio", "variant": "no_drums", "path": "hot.flac", **enc.measurements()}
    both = analysis.check_variants(tmp_path, [record, hot], 2.0)["clipping"]
    assert both.details["levels"]["no_drums"]["peak_dbfs"] <= 0.0 < hot["peak_dbfs"]
    assert not both.passed and both.severity == "error"
    assert both.description.startswith("clipping") and "no_drums" in both.description
    assert "instrumental" not in both.description  # the overshoot is not called clipping


def test_an_undecodable_variant_fails_every_variant_check(tmp_path):
    (tmp_path / "x.m4a").write_bytes(b"not audio at all" * 100)
    arts = [{"kind": "audio", "variant": "instrumental", "path": "x.m4a",
             "sample_rate": 44100, "channels": 2}]
    checks = analysis.check_variants(tmp_path, arts, 1.0)
    assert set(checks) == set(analysis.VARIANT_CHECKS)
    for outcome in checks.values():
        assert not outcome.passed and "unreadable" in outcome.description
        assert "instrumental" in outcome.description


def test_manifest_check_catches_schema_and_missing_files(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1}))
    outcome = analysis.check_manifest(tmp_path)
    assert not outcome.passed and "schema" in outcome.description
