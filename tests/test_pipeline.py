"""Full materialization of a track partition with real Dagster, demucs code and ffmpeg."""

import json
from pathlib import Path
import subprocess

import numpy as np
import pytest
from dagster import DagsterInstance, materialize
from mutagen import File as MutagenFile

from conftest import claim_tags, write_bundle
from imaker import audio, separation
from imaker.bundle import JobManifest, schema_errors
from imaker.fsutil import sha256_file
from imaker.pipeline import Library
from imaker.settings import load_settings
from imaker.variants import VARIANTS
from imaker_assets.assets import manifest, track_assets, variants
from oracles import load_stems
from resources import build_resources


def _materialize(job_id, selection=None):
    settings = load_settings()
    instance = DagsterInstance.get()
    if not instance.has_dynamic_partition("tracks", job_id):
        instance.add_dynamic_partitions("tracks", [job_id])
    result = materialize(track_assets, selection=selection, partition_key=job_id,
                         instance=instance, resources=build_resources(settings),
                         raise_on_error=False, tags=claim_tags(job_id))
    return result, settings


def test_track_materializes_with_contract_names_tags_and_manifest(imaker_env, source_m4a, cover_jpg):
    settings = load_settings()
    write_bundle(settings.paths.queue_youtube_audio, "yt_abc", source_m4a, cover=cover_jpg,
                 youtube={"video_id": "abc", "url": "https://www.youtube.com/watch?v=abc",
                          "channel": "AC/DC", "duration_online_s": 3.0})
    result, settings = _materialize("yt_abc")
    assert result.success
    out = settings.paths.outputs_dir / "yt_abc"
    names = sorted(p.name for p in (out / "files" / "audio").iterdir())
    assert names == ["AC_DC - Test Song (no drum).m4a", "AC_DC - Test Song.m4a"]

    data = json.loads((out / "manifest.json").read_text())
    assert schema_errors("manifest", data) == []
    source_duration = data["provenance"]["source"]["duration_s"]
    assert data["provenance"]["separation"]["model"] == "tiny_htdemucs"
    assert data["provenance"]["source"]["input_sha256"] == sha256_file(source_m4a)
    assert data["provenance"]["source"]["url"] == "https://www.youtube.com/watch?v=abc"
    assert [a["variant"] for a in data["artifacts"]] == ["instrumental", "no_drums"]
    for art in data["artifacts"]:
        path = out / art["path"]
        assert sha256_file(path) == art["sha256"] and path.stat().st_size == art["size_bytes"]
        assert abs(audio.probe(path)["duration_s"] - source_duration) <= 0.05
        tags = MutagenFile(path, easy=True)
        assert tags["artist"] == ["AC/DC"] and tags["album"] == ["YTDL"]
        assert tags["title"][0] == VARIANTS[art["variant"]].tagged_title("Test Song")
        raw = MutagenFile(path)
        assert bytes(raw.tags["----:com.apple.iTunes:IMAKER_JOB_ID"][0]) == b"yt_abc"
        assert bytes(raw.tags["covr"][0]) == cover_jpg.read_bytes()
    # the bundle is archived, nothing is left in the queue or in working/
    assert (settings.paths.archive_dir / "done" / "job_yt_abc" / "job.json").is_file()
    assert list(settings.paths.queue_youtube_audio.iterdir()) == []
    assert list(settings.paths.working_dir.iterdir()) == []
    # no temporary files anywhere in the outputs
    assert not [p for p in out.rglob("*") if ".part" in p.name]
    # the asset metadata users see in the UI
    mats = {m.asset_key.path[-1]: m for m in result.asset_materializations_for_node("stems")}
    assert mats["stems"].metadata["model"].value == "tiny_htdemucs"


def test_each_variant_equals_the_sum_of_its_stems(imaker_env, source_m4a, monkeypatch):
    monkeypatch.setenv("OUTPUT_AUDIO_FORMAT", "flac")  # lossless, so the check can be exact
    monkeypatch.setenv("GENERATE_DRUMS_ONLY_VARIANT", "true")
    monkeypatch.setenv("PRESERVE_STEMS", "true")
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "sum1", source_m4a, source_type="local")
    result, settings = _materialize("sum1")
    assert result.success
    stems, meta = load_stems(Library.from_settings(settings), "sum1")
    assert sorted(stems) == ["bass", "drums", "other", "vocals"]
    man = JobManifest.load(settings.paths.outputs_dir / "sum1")
    audio_arts = {a.variant: a for a in man.artifacts if a.kind == "audio"}
    assert sorted(audio_arts) == ["drums_only", "instrumental", "no_drums"]
    for name, art in audio_arts.items():
        got = audio.decode(settings.paths.outputs_dir / "sum1" / art.path, meta["sample_rate"], 2)
        expected = sum(stems[s] for s in VARIANTS[name].stems_for(list(stems)))
        expected = expected * 10 ** (art.gain_db / 20)
        assert np.max(np.abs(got - expected)) < 1e-4, name
        assert np.max(np.abs(got)) <= 10 ** (-1 / 20) + 1e-4  # never above -1 dBFS
    # vocals are really excluded: the instrumental differs from the full mix by the vocals
    assert np.max(np.abs(stems["vocals"])) > 1e-4
    stem_arts = sorted(a.variant for a in man.artifacts if a.kind == "stems")
    assert stem_arts == ["bass", "drums", "other", "vocals"] and man.stems_preserved


def test_adding_a_variant_later_reuses_stored_stems(imaker_env, source_m4a, monkeypatch):
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "later", source_m4a)
    assert _materialize("later")[0].success
    stems_json = settings.paths.stems_dir / "later" / "stems.json"
    before = stems_json.stat().st_mtime_ns

    calls = []
    real = separation.separate
    monkeypatch.setattr(separation, "separate", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("GENERATE_DRUMS_ONLY_VARIANT", "true")
    result, settings = _materialize("later", selection=[variants, manifest])
    assert result.success
    assert calls == [] and stems_json.stat().st_mtime_ns == before
    files = sorted(p.name for p in (settings.paths.outputs_dir / "later" / "files" / "audio").iterdir())
    assert "AC_DC - Test Song (drums only).m4a" in files
    man = JobManifest.load(settings.paths.outputs_dir / "later")
    assert "drums_only" in [a.variant for a in man.artifacts]


@pytest.mark.parametrize("case,stage,needle", [
    ("undecodable", "source_audio", "cannot read audio.m4a"),
    ("duration", "source_audio", "duration mismatch"),
])
def test_bad_audio_fails_into_failed_with_reason(imaker_env, source_m4a, tmp_path, case, stage, needle):
    settings = load_settings()
    if case == "undecodable":
        junk = tmp_path / "junk.m4a"
        junk.write_bytes(b"\x00garbage" * 1000)
        write_bundle(settings.paths.queue_other, "bad1", junk)
    else:
        write_bundle(settings.paths.queue_other, "bad1", source_m4a,
                     youtube={"video_id": "x", "url": "https://example.invalid/x",
                              "duration_online_s": 200.0})
    result, settings = _materialize("bad1")
    assert not result.success
    error = json.loads((settings.paths.archive_dir / "failed" / "job_bad1" / "error.json").read_text())
    assert error["job_id"] == "bad1" and error["stage"] == stage and needle in error["error"]
    assert (settings.paths.archive_dir / "failed" / "job_bad1" / "audio.m4a").is_file()  # nothing lost
    assert not (settings.paths.outputs_dir / "bad1").exists()


def test_separator_loads_through_demucs_repo_once_per_process(model_repo):
    a = separation.load_model("tiny_htdemucs", model_repo, "cpu")
    b = separation.load_model("tiny_htdemucs", model_repo, "cpu")
    assert a is b and a.sources == ("drums", "bass", "other", "vocals")
    from demucs.apply import BagOfModels

    assert isinstance(a.model, BagOfModels)  # came through demucs' own bag loading
    wav = (0.1 * np.random.default_rng(1).standard_normal((2, 44100))).astype(np.float32)
    out = separation.separate(a, wav)
    assert set(out) == set(a.sources) and all(v.shape == wav.shape for v in out.values())
    silent = separation.separate(a, np.zeros_like(wav))
    assert all(not v.any() for v in silent.values())


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(separation.SeparationError,
                       match="demucs model 'nope' is not in the model repo .*: 'nope' is not "
                             "one of demucs' models .*htdemucs"):
        separation.load_model("nope", tmp_path, "cpu")
    # a demucs model: the command that fetches it
    with pytest.raises(separation.SeparationError, match="run `imaker models fetch htdemucs`"):
        separation.load_model("htdemucs", tmp_path, "cpu")


def test_disk_error_in_outputs_fails_the_job_with_reason_and_keeps_the_stems(
        imaker_env, source_m4a, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the outputs folder should be")
    monkeypatch.setenv("OUTPUTS_DIR", str(blocker / "outputs"))
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "disk1", source_m4a)
    result, settings = _materialize("disk1")
    assert not result.success
    error = json.loads((settings.paths.archive_dir / "failed" / "job_disk1" / "error.json").read_text())
    assert error["stage"] == "variants" and "NotADirectoryError" in error["error"]
    assert (settings.paths.stems_dir / "disk1" / "stems.json").is_file()  # separation is not lost

    # once the disk is fixed, `imaker retry` puts the bundle back in its queue (error.json
    # kept as history) and the track is processed again
    blocker.unlink()
    from imaker.queues import QueueStore

    QueueStore.from_settings(settings).requeue_failed("disk1")
    assert (settings.paths.queue_other / "job_disk1" / ".imaker" / "history").is_dir()
    result, settings = _materialize("disk1")
    assert result.success
    assert (settings.paths.outputs_dir / "disk1" / "manifest.json").is_file()
    assert (settings.paths.archive_dir / "done" / "job_disk1").is_dir()
    assert not (settings.paths.archive_dir / "failed" / "job_disk1").exists()


def _stream_md5(path, stream):
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", f"0:{stream}:0",
                          "-c", "copy", "-f", "md5", "-"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_bundle_with_video_gets_the_instrumental_muxed_into_an_mp4(imaker_env, source_m4a, tmp_path):
    video = tmp_path / "video.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=10:duration=3", "-f", "lavfi", "-i",
                    "sine=frequency=300:duration=3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", "-shortest", str(video)], check=True)
    settings = load_settings()
    folder = write_bundle(settings.paths.queue_youtube_video, "vid1", source_m4a, video="video.mp4")
    import shutil as _sh

    _sh.copy(video, folder / "video.mp4")
    result, settings = _materialize("vid1")
    assert result.success
    out = settings.paths.outputs_dir / "vid1"
    mp4 = out / "files" / "video" / "AC_DC - Test Song.mp4"
    info = audio.probe(mp4)
    assert info["video"]["codec"] == "h264" and info["audio"]["codec"] == "aac"
    assert _stream_md5(mp4, "v") == _stream_md5(video, "v")  # video copied, not re-encoded
    instrumental = out / "files" / "audio" / "AC_DC - Test Song.m4a"
    assert _stream_md5(mp4, "a") == _stream_md5(instrumental, "a")  # the instrumental's audio
    man = JobManifest.load(out)
    [vid] = [a for a in man.artifacts if a.kind == "video"]
    assert vid.path == "files/video/AC_DC - Test Song.mp4" and vid.codec == "h264+aac"
    assert vid.sha256 == sha256_file(mp4)
    assert schema_errors("manifest", man.to_dict()) == []


def test_outputs_are_readable_by_other_users_and_follow_umask(imaker_env, source_m4a, monkeypatch):
    """Files 0644 and folders 0755 with the usual umask 022 (a media server running as
    another user reads them); UMASK=027 gives 0640/0750."""
    import os
    import stat

    from imaker.fsutil import apply_umask, current_umask

    from dagster_server import free_port
    from imaker.separator.client import SeparatorClient

    old = current_umask()
    try:
        for umask, fmode, dmode, job_id in ((0o022, 0o644, 0o755, "perm1"),
                                            (0o027, 0o640, 0o750, "perm2")):
            monkeypatch.setenv("UMASK", f"{umask:03o}")
            # the separation service writes the stems: one started with this UMASK
            monkeypatch.setenv("SEPARATOR_PORT", str(free_port()))
            apply_umask(load_settings().paths.umask)
            settings = load_settings()
            write_bundle(settings.paths.queue_other, job_id, source_m4a)
            assert _materialize(job_id)[0].success
            roots = [settings.paths.outputs_dir / job_id, settings.paths.library_dir / job_id,
                     settings.paths.stems_dir / job_id]
            for root in roots:
                for path in [root, *root.rglob("*")]:
                    mode = stat.S_IMODE(path.stat().st_mode)
                    assert mode == (dmode if path.is_dir() else fmode), (path, oct(mode))
            os.kill(SeparatorClient.from_settings(settings).health()["pid"], 15)
    finally:
        os.umask(old)


def test_failed_run_re_executed_with_its_drop_moves_the_bundle_to_done(
        imaker_env, source_m4a, tmp_path, monkeypatch):
    """What "Re-execute from failure" in the UI does: the failed steps (and what follows:
    the blocking checks, manifest, nas_copy) run again with the run's tags (its drop id);
    the bundle, already in failed/, moves to done/, and the track is green in the UI:
    every asset of the partition materialized, every check passed."""
    from dagster import AssetKey, AssetSelection
    from dagster._core.storage.partition_status_cache import AssetPartitionStatus

    from imaker_assets.checks import track_checks
    from imaker_assets.nas import nas_copy
    from imaker_assets.partitions import tracks

    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the outputs folder should be")
    monkeypatch.setenv("OUTPUTS_DIR", str(blocker / "outputs"))
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "redo1", source_m4a)
    tags = claim_tags("redo1")
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", ["redo1"])
    everything = [*track_assets, nas_copy, *track_checks]
    first = materialize(everything, partition_key="redo1", instance=instance,
                        resources=build_resources(settings), raise_on_error=False, tags=tags)
    assert not first.success
    assert (settings.paths.archive_dir / "failed" / "job_redo1" / "error.json").is_file()

    def status(name):
        return instance.get_status_by_partition(AssetKey(name), ["redo1"], tracks)["redo1"]

    assert status("variants") == AssetPartitionStatus.FAILED
    blocker.unlink()
    again = materialize(everything, selection=AssetSelection.assets(variants, manifest, nas_copy),
                        partition_key="redo1", instance=instance,
                        resources=build_resources(settings), raise_on_error=False, tags=tags)
    assert again.success
    assert (settings.paths.archive_dir / "done" / "job_redo1").is_dir()
    assert not (settings.paths.archive_dir / "failed" / "job_redo1").exists()
    assert (settings.paths.outputs_dir / "redo1" / "manifest.json").is_file()
    for name in ("source_audio", "stems", "variants", "manifest", "nas_copy"):
        assert status(name) == AssetPartitionStatus.MATERIALIZED, name
    evaluations = {e.check_name: e.passed for e in again.get_asset_check_evaluations()}
    assert set(evaluations) == {key.name for checks in track_checks for key in checks.check_keys}
    assert all(evaluations.values())


def test_an_input_over_full_scale_is_stored_and_separated_unclipped(imaker_env, tmp_path):
    """A float WAV peaking at 1.5 (as loud AAC/MP3 decodes do): the stored source keeps the
    decoded signal (scaled, with the scale beside it), the separation reads exactly the
    decoded samples, the manifest records the input's peak."""
    t = np.arange(3 * 44100) / 44100
    loud = np.stack([1.5 * np.sin(2 * np.pi * 220 * t), 1.2 * np.sin(2 * np.pi * 330 * t)])
    wav = tmp_path / "loud.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", "44100",
                    "-ac", "2", "-i", "pipe:0", "-c:a", "pcm_f32le", str(wav)],
                   input=np.ascontiguousarray(loud.T).astype("<f4").tobytes(), check=True)
    settings = load_settings()
    folder = write_bundle(settings.paths.queue_other, "loud1", None, audio="loud.wav")
    import shutil as _sh

    _sh.copy(wav, folder / "loud.wav")
    decoded = audio.decode(folder / "loud.wav", 44100, 2)
    assert abs(float(np.abs(decoded).max()) - 1.5) < 1e-3
    assert _materialize("loud1")[0].success
    from imaker.pipeline import read_source

    lib = Library.from_settings(settings)
    stored = read_source(lib.track_dir("loud1") / "source.flac")
    err = decoded - stored
    snr = 10 * np.log10((decoded ** 2).sum() / (err ** 2).sum())
    assert snr > 100, snr                                     # not clipped (13.7 dB before)
    source = json.loads((lib.track_dir("loud1") / "source.json").read_text())
    assert abs(source["input_peak"] - 1.5) < 1e-3 and source["scale"] < 0.7
    man = json.loads((settings.paths.outputs_dir / "loud1" / "manifest.json").read_text())
    assert abs(man["provenance"]["source"]["input_peak_dbfs"] - 20 * np.log10(1.5)) < 0.01
    # the stems add up to the decoded input (up to the model), and the variants obey the
    # anti-clipping rule: nothing above -1 dBFS
    for art in man["artifacts"]:
        peak = np.abs(audio.decode(settings.paths.outputs_dir / "loud1" / art["path"], 44100, 2)).max()
        assert peak <= 10 ** (-1 / 20) + 0.02, (art["path"], peak)


def test_launchpad_resource_config_overrides_a_setting_for_one_run(imaker_env, source_m4a,
                                                                    monkeypatch):
    """The `settings` resource's launchpad config (the run config the UI sends) changes one
    setting for one run; every other setting keeps the value the code location loaded
    (here GENERATE_NO_DRUMS_VARIANT=false from the environment, not the model's default)."""
    from imaker_assets.definitions import build_defs

    monkeypatch.setenv("GENERATE_NO_DRUMS_VARIANT", "false")
    settings = load_settings()
    instance = DagsterInstance.get()
    job = build_defs(settings).resolve_job_def("ingest_track")
    override = {"resources": {"settings": {"config": {"output": {"audio_format": "flac"}}}}}
    for job_id, run_config in (("as_loaded", {}), ("overridden", override)):
        write_bundle(settings.paths.queue_other, job_id, source_m4a)
        instance.add_dynamic_partitions("tracks", [job_id])
        result = job.execute_in_process(run_config=run_config, instance=instance,
                                        partition_key=job_id, tags=claim_tags(job_id),
                                        raise_on_error=False)
        assert result.success, job_id
    audio_dir = settings.paths.outputs_dir / "{}" / "files" / "audio"
    assert sorted(p.name for p in Path(str(audio_dir).format("as_loaded")).iterdir()) == \
        ["AC_DC - Test Song.m4a"]
    assert sorted(p.name for p in Path(str(audio_dir).format("overridden")).iterdir()) == \
        ["AC_DC - Test Song.flac"]
    # a value the launchpad's types refuse (Dagster checks the allowed values) ...
    from dagster import DagsterInvalidConfigError

    write_bundle(settings.paths.queue_other, "bad_override", source_m4a)
    instance.add_dynamic_partitions("tracks", ["bad_override"])
    with pytest.raises(DagsterInvalidConfigError, match="audio_format"):
        job.execute_in_process(
            run_config={"resources": {"settings": {"config": {"output": {"audio_format": "wav"}}}}},
            instance=instance, partition_key="bad_override", tags=claim_tags("bad_override"))
    # ... and one only the settings model refuses: the run fails with its one-line error
    bad = {"resources": {"settings": {"config": {"separation": {"overlap": 1.5}}}}}
    result = job.execute_in_process(run_config=bad, instance=instance, partition_key="bad_override",
                                    tags=claim_tags("bad_override"), raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and "DEMUCS_OVERLAP=1.5: Input should be less than 1" in \
        failures[0].step_failure_data.error.to_string()


def test_long_inputs_are_never_whole_in_the_stages_memory(imaker_env, tmp_path):
    """The source stage and the separation decode the track into an unnamed file on the data
    disk and map it (``audio.decode(scratch=)``), measuring it chunk by chunk, so their
    memory does not grow with the track: numpy's buffers (reported to tracemalloc; torch's
    are not) for a 90 s input are those of a 45 s one, where decoding into memory held the
    track two or three times over (a 1-hour input: 2.5-3.6 GB in a run process and in the
    separation service). The stored source and stems are still the decoded input's."""
    import threading
    import tracemalloc

    from conftest import make_audio
    from imaker.pipeline import prepare_source, read_source, separate_to_folder
    from imaker.queues import QueueStore
    from imaker.separator.service import SeparateRequest, Service, _Separator

    settings = load_settings()
    store, lib = QueueStore.from_settings(settings), Library.from_settings(settings)
    peaks: dict[tuple[str, int], int] = {}
    for seconds in (5, 45, 90):  # 5 s: a warm-up (a backend's first pass allocates once)
        job_id = f"long{seconds}"
        src = make_audio(tmp_path / f"{job_id}.flac", seconds)
        write_bundle(settings.paths.queue_other, job_id, src, audio="audio.flac")
        claim = store.claim(next(j for j in store.discover() if j.job_id == job_id), by="test")
        req = SeparateRequest(job_id=job_id, source=str(lib.track_dir(job_id) / "source.flac"),
                              stems_dir=str(lib.stem_dir(job_id)),
                              separation=settings.separation, variants=["instrumental"])
        separator = _Separator(Service(concurrency=1), req, threading.Event())
        for name in separator.plan.models:
            separator.load(name)  # as in a warm service: the model is not the stage's memory
        for stage, run in (
                ("source", lambda: prepare_source(store, lib, job_id, claim.drop_id)),
                ("stems", lambda: separate_to_folder(Path(req.source), Path(req.stems_dir),
                                                     job_id, separator))):
            tracemalloc.start()
            try:
                meta = run()
                peaks[stage, seconds] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert meta["duration_s"] == pytest.approx(seconds, abs=0.05)
        stored = read_source(lib.track_dir(job_id) / "source.flac")
        np.testing.assert_allclose(stored, audio.decode(src, 44100, 2), atol=2.0**-22)
    added = 45 * 44100 * 2 * 4  # the longer track's extra float32 stereo: 16 MB
    for stage in ("source", "stems"):
        assert peaks[stage, 90] - peaks[stage, 45] < added / 4, peaks
    assert sorted(p.name for p in lib.library_dir.iterdir()) == ["long45", "long5", "long90"]
    assert not [p for p in lib.stems_dir.rglob("*") if p.name.startswith(".")]  # no scratch
