"""INSTRUMENTAL_MODEL end to end (issue 21): RoFormer models beside demucs, chosen per
variant, in the separation service, with lineage and staleness in Dagster, and the
`imaker models add|list|fetch` commands. Real parts throughout: the tiny random RoFormer
configs of test_roformer.py, the tiny demucs model of conftest.py, the auto-started
separation service, Dagster on a real instance, ffmpeg, an HTTP mirror on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from dagster import DagsterInstance, materialize
from dagster._core.definitions.data_version import StaleStatus
from dagster._utils.test.data_versions import get_stale_status_resolver

from conftest import MODEL_NAME, claim_tags, write_bundle
from imaker import audio, roformer, stemset
from imaker.bundle import schema_errors
from imaker.cli import main as imaker_main
from imaker.roformer import install
from imaker.settings import Separation, load_settings
from imaker_assets.assets import separation_models, stems, track_assets
from imaker_assets.definitions import build_defs
from resources import build_resources
from test_roformer import bs_yaml, mel_yaml, snr_db, write_model

ROFO_A, ROFO_B = "rofo_bs", "rofo_mel"
#: a config of another architecture (MDX23C's options): not a RoFormer we run
MDX23C_YAML = ("audio: {chunk_size: 261120, sample_rate: 44100}\nmodel: {act: gelu, "
               "num_subbands: 4}\ntraining: {instruments: [vocals, other]}\n")


@pytest.fixture(scope="module")
def rofo_files(tmp_path_factory) -> Path:
    """Tiny random BS-RoFormer (target vocals: vocals + other) and Mel-Band RoFormer
    (vocals, other) checkpoints + configs, outside any model folder."""
    folder = tmp_path_factory.mktemp("rofo")
    write_model(folder, ROFO_A, bs_yaml(), seed=1)
    write_model(folder, ROFO_B, mel_yaml(), seed=2)
    return folder


@pytest.fixture
def repo(tmp_path, model_repo, rofo_files, monkeypatch) -> Path:
    """A model folder with both families: the tiny demucs model and the two RoFormers."""
    folder = tmp_path / "models"
    shutil.copytree(model_repo, folder)
    for name in (ROFO_A, ROFO_B):
        for ext in (".ckpt", ".yaml"):
            shutil.copy(rofo_files / f"{name}{ext}", folder)
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(folder))
    # PyTorch for demucs: this fresh folder has no converted OpenVINO graph (~30 s to make)
    monkeypatch.setenv("DEMUCS_BACKEND", "torch")
    return folder


def _materialize(job_id, assets=track_assets, tags=None):
    settings = load_settings()
    instance = DagsterInstance.get()
    if not instance.has_dynamic_partition("tracks", job_id):
        instance.add_dynamic_partitions("tracks", [job_id])
    result = materialize(assets, partition_key=job_id, instance=instance,
                         resources=build_resources(settings), raise_on_error=False,
                         tags=tags if tags is not None else claim_tags(job_id))
    return result, settings, instance


def _observe_models(instance):
    """One tick of the models sensor, its observation stored as the daemon stores it."""
    from dagster import build_sensor_context

    defs = build_defs(load_settings())
    sensor = defs.resolve_sensor_def("models_sensor")
    cursor = getattr(_observe_models, "cursor", None)
    result = sensor(build_sensor_context(instance=instance, definitions=defs, cursor=cursor,
                                         resources=build_resources(load_settings())))
    for event in getattr(result, "asset_events", None) or []:
        instance.report_runless_asset_event(event)
    _observe_models.cursor = getattr(result, "cursor", cursor)
    return result


def _flac(path: Path) -> np.ndarray:
    return audio.decode(path, 44100, 2)


def test_plan_runs_demucs_only_for_the_variants_that_need_it():
    base = Separation(model="htdemucs")
    assert stemset.plan(base, ["instrumental"]).models == ("htdemucs",)
    rofo = base.model_copy(update={"instrumental_model": ("a", "b")})
    assert stemset.plan(rofo, ["instrumental"]).models == ("a", "b")       # no demucs at all
    p = stemset.plan(rofo, ["instrumental", "drums_only"])
    assert p.models == ("a", "b", "htdemucs") and p.needs == ("drums",)
    assert Separation.model_validate({"INSTRUMENTAL_MODEL": "a, b"}).instrumental_model == ("a", "b")
    # the variants' stems: the table mixes them as demucs stems, one path
    recs = {"a": {"folder": "a", "sources": ["vocals", "other"], "scale": 1.0},
            "b": {"folder": "b", "sources": ["Vocals", "Instrumental"], "scale": 0.5},
            "htdemucs": {"folder": "htdemucs", "sources": ["drums", "bass", "other", "vocals"],
                         "scale": 1.0}}
    stems_ = stemset.compose(p, recs)
    assert sorted(stems_) == ["drums", "rest", "vocals"]
    assert [(t["file"], t["weight"]) for t in stems_["rest"]] == [
        ("a/other.flac", 0.5), ("b/Instrumental.flac", 0.5), ("htdemucs/drums.flac", -1.0)]


def test_instrumental_model_end_to_end_stale_and_backfill(imaker_env, repo, source_m4a,
                                                          monkeypatch):
    """A bundle with INSTRUMENTAL_MODEL set: the RoFormer instrumental and the demucs drum
    variants, both models named with sha256 in the manifest. Switching the model marks
    the track's stems stale in Dagster; a backfill re-separates with the new model only
    (the demucs stems are not written again)."""
    monkeypatch.setenv("INSTRUMENTAL_MODEL", ROFO_A)
    monkeypatch.setenv("GENERATE_DRUMS_ONLY_VARIANT", "true")
    monkeypatch.setenv("OUTPUT_AUDIO_FORMAT", "flac")
    settings = load_settings()
    instance = DagsterInstance.get()
    assert _observe_models(instance).asset_events  # the first tick records the models
    write_bundle(settings.paths.queue_youtube_audio, "rofo1", source_m4a)
    result, settings, instance = _materialize("rofo1")
    assert result.success

    folder = settings.paths.stems_dir / "rofo1"
    meta = json.loads((folder / "stems.json").read_text())
    assert [m["name"] for m in meta["models"]] == [ROFO_A, MODEL_NAME]
    assert meta["separated"] == [ROFO_A, MODEL_NAME] and meta["sources"] == ["drums", "vocals", "rest"]
    rofo_sha = roformer.file_sha256(repo / f"{ROFO_A}.ckpt")
    assert meta["models"][0]["sha256"] == rofo_sha
    assert meta["models"][0]["architecture"] == "bs_roformer"
    assert meta["models"][1]["family"] == "demucs" and len(meta["models"][1]["sha256"]) == 64

    # the variants: the RoFormer instrumental, that minus the demucs drums, those drums
    out = settings.paths.outputs_dir / "rofo1"
    man = json.loads((out / "manifest.json").read_text())
    assert schema_errors("manifest", man) == []
    sep = man["provenance"]["separation"]
    assert sep["instrumental_model"] == [ROFO_A]
    assert {(m["name"], m["sha256"]) for m in sep["models"]} == {
        (ROFO_A, rofo_sha), (MODEL_NAME, meta["models"][1]["sha256"])}
    # DEMUCS_CPU_AUTOCAST=auto governs the RoFormer model too: bf16 where the CPU has AMX
    from imaker.separation import cpu_has_amx_bf16
    assert [(m["device"], m["precision"]) for m in sep["models"]][0] == (
        "cpu", "bf16" if cpu_has_amx_bf16() else "fp32")
    assert sep["models"][1]["precision"] in ("fp32", "bf16")   # DEMUCS_CPU_AUTOCAST=auto
    assert sep["models"][0]["stems"] == ["vocals", "other"] and len(sep["models"][1]["stems"]) == 4
    assert sep["models"][0]["architecture"] == "bs_roformer"
    arts = {a["variant"]: a for a in man["artifacts"] if a["kind"] == "audio"}
    assert set(arts) == {"instrumental", "no_drums", "drums_only"}
    rofo_dir, demucs_dir = folder / ROFO_A, folder / MODEL_NAME
    a_meta = json.loads((rofo_dir / "model.json").read_text())
    d_meta = json.loads((demucs_dir / "model.json").read_text())
    instrumental = _flac(rofo_dir / "other.flac") / a_meta["scale"]
    drums = _flac(demucs_dir / "drums.flac") / d_meta["scale"]
    for variant, expected in (("instrumental", instrumental), ("no_drums", instrumental - drums),
                              ("drums_only", drums)):
        got = _flac(out / arts[variant]["path"]) / 10 ** (arts[variant]["gain_db"] / 20)
        assert snr_db(expected, got) > 60, variant   # 24-bit FLAC rounding only

    # switching the model: Dagster shows the track's stems stale (upstream models changed)
    graph_assets = [*track_assets, separation_models]
    assert get_stale_status_resolver(instance, graph_assets).get_status(
        stems.key, "rofo1") == StaleStatus.FRESH
    monkeypatch.setenv("INSTRUMENTAL_MODEL", ROFO_B)
    assert _observe_models(instance).asset_events
    resolver = get_stale_status_resolver(instance, graph_assets)
    assert resolver.get_status(stems.key, "rofo1") == StaleStatus.STALE
    [cause] = resolver.get_stale_root_causes(stems.key, "rofo1")
    assert cause.asset_key == separation_models.key

    # a backfill (no drop: the archived bundle) re-separates with the new model only
    demucs_files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in demucs_dir.iterdir()}
    result, settings, instance = _materialize("rofo1", tags={})
    assert result.success
    meta = json.loads((folder / "stems.json").read_text())
    assert meta["separated"] == [ROFO_B]
    assert [m["name"] for m in meta["models"]] == [ROFO_B, MODEL_NAME]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in demucs_dir.iterdir()} == demucs_files
    assert (rofo_dir / "other.flac").is_file()  # the other model's stems stay, separable
    man = json.loads((out / "manifest.json").read_text())
    assert man["provenance"]["separation"]["instrumental_model"] == [ROFO_B]
    assert get_stale_status_resolver(instance, graph_assets).get_status(
        stems.key, "rofo1") == StaleStatus.FRESH
    from imaker.catalog import build_catalog

    row = build_catalog(settings.paths.outputs_dir, settings.paths.stems_dir).iloc[0]
    assert row["instrumental_model"] == f"{ROFO_B}@{roformer.file_sha256(repo / f'{ROFO_B}.ckpt')[:12]}"


def test_instrumental_only_never_runs_demucs_until_a_drum_variant_is_backfilled(
        imaker_env, repo, source_m4a, monkeypatch, capsys):
    """An ensemble instrumental without drum variants: demucs does not run. Then `imaker
    backfill --variants drums_only`: the stems step runs demucs for the drums and reuses
    the RoFormer stems."""
    from imaker_assets import operations

    monkeypatch.setenv("INSTRUMENTAL_MODEL", f"{ROFO_A},{ROFO_B}")   # an ensemble
    monkeypatch.setenv("GENERATE_NO_DRUMS_VARIANT", "false")
    monkeypatch.setenv("OUTPUT_AUDIO_FORMAT", "flac")
    settings = load_settings()
    write_bundle(settings.paths.queue_youtube_audio, "rofo2", source_m4a)
    result, settings, _ = _materialize("rofo2")
    assert result.success
    folder = settings.paths.stems_dir / "rofo2"
    meta = json.loads((folder / "stems.json").read_text())
    assert [m["name"] for m in meta["models"]] == [ROFO_A, ROFO_B]
    assert not (folder / MODEL_NAME).exists()        # the 4-stem model did not run
    assert meta["sources"] == ["vocals", "instrumental"]
    a = _flac(folder / ROFO_A / "other.flac") / meta["models"][0]["scale"]
    b = _flac(folder / ROFO_B / "other.flac") / meta["models"][1]["scale"]
    man = json.loads((settings.paths.outputs_dir / "rofo2" / "manifest.json").read_text())
    [art] = [x for x in man["artifacts"] if x["kind"] == "audio"]
    got = _flac(settings.paths.outputs_dir / "rofo2" / art["path"]) / 10 ** (art["gain_db"] / 20)
    assert snr_db((a + b) / 2, got) > 60

    rofo_mtime = (folder / ROFO_A / "other.flac").stat().st_mtime_ns
    instance = DagsterInstance.get()
    assert operations.backfill_variants(instance, settings, ["drums_only"], ["rofo2"]) == 0
    assert "lack what drums_only needs" in capsys.readouterr().out
    meta = json.loads((folder / "stems.json").read_text())
    assert meta["separated"] == [MODEL_NAME] and meta["sources"] == ["drums", "vocals", "rest"]
    assert (folder / ROFO_A / "other.flac").stat().st_mtime_ns == rofo_mtime
    man = json.loads((settings.paths.outputs_dir / "rofo2" / "manifest.json").read_text())
    assert [a["variant"] for a in man["artifacts"]] == ["instrumental", "drums_only"]


@pytest.mark.parametrize("broken", ["garbage_ckpt", "unsupported_architecture"])
def test_broken_checkpoint_fails_the_track_with_a_reason_and_nothing_written(
        imaker_env, repo, source_m4a, monkeypatch, broken):
    if broken == "garbage_ckpt":
        (repo / "bad.ckpt").write_bytes(b"not a checkpoint" * 100)
        shutil.copy(repo / f"{ROFO_A}.yaml", repo / "bad.yaml")
        reason = str(repo / "bad.ckpt")
    else:
        shutil.copy(repo / f"{ROFO_A}.ckpt", repo / "bad.ckpt")
        (repo / "bad.yaml").write_text(MDX23C_YAML)
        reason = str(repo / "bad.yaml")
    monkeypatch.setenv("INSTRUMENTAL_MODEL", "bad")
    settings = load_settings()
    write_bundle(settings.paths.queue_youtube_audio, "rofobad", source_m4a)
    result, settings, _ = _materialize("rofobad")
    assert not result.success
    [failed] = list((settings.paths.archive_dir / "failed").glob("*rofobad*"))
    error = json.loads((failed / "error.json").read_text())
    assert error["stage"] == "stems"
    assert "cannot load RoFormer model 'bad'" in error["error"] and reason in error["error"]
    assert "\n" not in error["error"]
    folder = settings.paths.stems_dir / "rofobad"
    assert not folder.exists() or not any(folder.iterdir())   # nothing half-written


# ----- imaker models add | list | fetch ---------------------------------------------------
def test_models_add_and_list(imaker_env, tmp_path, rofo_files, monkeypatch, capsys):
    repo = tmp_path / "models"
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(repo))
    ckpt, cfg = rofo_files / f"{ROFO_B}.ckpt", rofo_files / f"{ROFO_B}.yaml"
    assert imaker_main(["models", "add", str(ckpt), str(cfg), "--name", "kim_tiny"]) == 0
    assert "mel_band_roformer" in capsys.readouterr().out
    assert roformer.is_roformer("kim_tiny", repo)
    # a checkpoint that does not match its config: refused with one line, nothing copied
    assert imaker_main(["models", "add", str(rofo_files / f"{ROFO_A}.ckpt"), str(cfg),
                        "--name", "mismatch"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(rofo_files / f"{ROFO_A}.ckpt") in err and "does not match" in err
    assert sorted(p.name for p in repo.iterdir()) == ["kim_tiny.ckpt", "kim_tiny.yaml"]
    # a config of an unsupported architecture: its file named
    bad = tmp_path / "mdx23c.yaml"
    bad.write_text(MDX23C_YAML)
    assert imaker_main(["models", "add", str(ckpt), str(bad)]) == 1
    assert str(bad) in capsys.readouterr().err
    # list: family, architecture, stems, size, sha256, loads (or why not)
    shutil.copy(rofo_files / f"{ROFO_A}.ckpt", repo / "broken.ckpt")
    shutil.copy(cfg, repo / "broken.yaml")
    assert imaker_main(["models", "list"]) == 1   # one does not load
    out = capsys.readouterr().out
    sha = roformer.file_sha256(ckpt)
    line = next(li for li in out.splitlines() if li.startswith("kim_tiny"))
    assert "roformer, mel_band_roformer, stems vocals,other" in line and sha in line
    assert line.endswith("loads")
    line = next(li for li in out.splitlines() if li.startswith("broken"))
    assert "does not load" in line and "does not match" in line


class _Mirror:
    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_models_fetch_from_a_mirror_verifies_the_sha256(imaker_env, tmp_path, rofo_files,
                                                        monkeypatch, capsys):
    repo = tmp_path / "models"
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(repo))
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(rofo_files / f"{ROFO_B}.ckpt", served / "MelBand.ckpt")
    shutil.copy(rofo_files / f"{ROFO_B}.yaml", served / "config_melband.yaml")
    (served / "Corrupt.ckpt").write_bytes((served / "MelBand.ckpt").read_bytes()[:-10] + b"x" * 10)
    sha = roformer.file_sha256(served / "MelBand.ckpt")
    table = {
        "good": install.Published("good", "https://example.invalid/x/MelBand.ckpt",
                                  "https://example.invalid/x/config_melband.yaml", sha, "test"),
        "corrupt": install.Published("corrupt", "https://example.invalid/Corrupt.ckpt",
                                     "https://example.invalid/config_melband.yaml", sha, "test"),
        "nohash": install.Published("nohash", "https://example.invalid/MelBand.ckpt",
                                    "https://example.invalid/config_melband.yaml", None, "test"),
        # a config pinned by its sha256: another file at that URL is refused
        "otheryaml": install.Published("otheryaml", "https://example.invalid/MelBand.ckpt",
                                       "https://example.invalid/config_melband.yaml", sha,
                                       "test", yaml_sha256="0" * 64),
    }
    monkeypatch.setattr(install, "CATALOGUE", table)
    mirror = _Mirror(served)
    try:
        assert imaker_main(["models", "fetch", "good", "--url", mirror.url]) == 0
        assert roformer.file_sha256(repo / "good.ckpt") == sha
        assert install.listing(repo)[0]["loads"]
        assert imaker_main(["models", "fetch", "corrupt", "--url", mirror.url]) == 1
        err = capsys.readouterr().err
        assert "does not match its checksum" in err and "\n" not in err.strip()
        assert imaker_main(["models", "fetch", "nohash", "--url", mirror.url]) == 1
        assert "no published sha256" in capsys.readouterr().err
        assert imaker_main(["models", "fetch", "nohash", "--url", mirror.url,
                            "--sha256", sha]) == 0
        assert imaker_main(["models", "fetch", "otheryaml", "--url", mirror.url]) == 1
        err = capsys.readouterr().err
        assert "config_melband.yaml" in err and "does not match its checksum" in err, err
    finally:
        mirror.close()
    # nothing half-written: only the two verified models, no temporary files
    assert sorted(p.name for p in repo.iterdir()) == ["good.ckpt", "good.yaml", "nohash.ckpt",
                                                      "nohash.yaml"]


def test_the_catalogue_pins_the_published_checkpoints(imaker_env, tmp_path, monkeypatch, capsys):
    """Kim's and ep_317's digests are in the catalogue: a fetch with another --sha256 is
    refused before anything is downloaded (the URLs are never contacted here)."""
    pinned = {n: e.ckpt_sha256 for n, e in install.CATALOGUE.items() if e.ckpt_sha256}
    assert set(pinned) >= {"mel_band_roformer_kim", "bs_roformer_ep_317_viperx"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pinned.values())
    # their configs at a fixed commit, pinned to the bytes of the copies in tests/data
    released = Path(__file__).parent / "data" / "roformer"
    for name in ("mel_band_roformer_kim", "bs_roformer_ep_317_viperx"):
        entry = install.CATALOGUE[name]
        assert re.search(r"/[0-9a-f]{40}/configs/", entry.yaml_url), entry.yaml_url
        assert entry.yaml_sha256 == roformer.file_sha256(released / entry.files[1])
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(tmp_path / "models"))
    assert imaker_main(["models", "fetch", "mel_band_roformer_kim", "--sha256", "0" * 64]) == 1
    assert "differs from the catalogue's 87201f4d" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


# ----- imaker eval ------------------------------------------------------------------------
def test_eval_agrees_with_museval_on_generated_songs(imaker_env, repo, tmp_path, monkeypatch,
                                                     capsys):
    """`imaker eval` on songs with known stems (imaker dev-song, MUSDB18-HQ layout): its
    BSS-eval v4 median SDR agrees with museval's evaluate within 0.01 dB, its multisong SDR
    is 10 log10(||s||²/||s-ŝ||²); the table goes to a results file."""
    museval = pytest.importorskip("museval")
    from imaker import devsong, evaluate

    songs = tmp_path / "songs"
    first, _ = devsong.generate(songs, count=2, seed=3, seconds=4.0)
    settings = load_settings()
    loaded = stemset.load(ROFO_A, repo, "cpu")
    for track in evaluate.tracks(songs):
        mix, refs = evaluate.read_track(track)
        ests = evaluate.separate(loaded, mix, settings.separation)
        assert sorted(ests) == ["instrumental", "other", "vocals"]
        np.testing.assert_allclose(refs["instrumental"], refs["drums"] + refs["bass"] + refs["other"],
                                   atol=1e-6)
        ests.pop("other")  # museval takes ~2 s per stem and track: two stems are enough
        got = evaluate.score_track(refs, ests)
        for stem in ("vocals", "instrumental"):
            sdr, _, _, _ = museval.evaluate(refs[stem].T[None], ests[stem].T[None])
            assert abs(got["bsseval"][stem] - float(np.nanmedian(sdr))) < 0.01
            ref64, est64 = refs[stem].astype(np.float64), ests[stem].astype(np.float64)
            expected = 10 * np.log10(np.sum(ref64 ** 2) / np.sum((ref64 - est64) ** 2))
            assert abs(got["multisong"][stem] - expected) < 0.01
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    one = tmp_path / "one"
    one.mkdir()
    shutil.move(str(first), one)
    assert imaker_main(["eval", str(one), "--model", ROFO_A, "--write", str(results)]) == 0
    table = results.read_text()
    assert table.startswith("# Results\n") and f"| {ROFO_A} | instrumental |" in table
    assert table.split("\n", 2)[2].strip() in capsys.readouterr().out


def test_a_preloaded_service_loads_only_the_models_the_settings_tracks_use(
        tmp_path, model_repo, rofo_files, monkeypatch):
    """`imaker separator serve --preload` (what `imaker ingest` and serve.sh start) loads the
    models of the settings' plan before it answers: with the drum variants off, only the
    RoFormer, in a model folder that holds no demucs model at all; with them on, demucs too."""
    from conftest import stop_separator
    from dagster_server import free_port
    from imaker.separator.client import SeparatorClient

    only_rofo = tmp_path / "only_rofo"
    only_rofo.mkdir()
    for ext in (".ckpt", ".yaml"):
        shutil.copy(rofo_files / f"{ROFO_B}{ext}", only_rofo)
    both = tmp_path / "both"
    shutil.copytree(model_repo, both)
    for ext in (".ckpt", ".yaml"):
        shutil.copy(rofo_files / f"{ROFO_B}{ext}", both)
    monkeypatch.setenv("IMAKER_ENV_FILE", "")
    monkeypatch.setenv("INSTRUMENTAL_MODEL", ROFO_B)
    monkeypatch.setenv("DEMUCS_MODEL", MODEL_NAME)
    monkeypatch.setenv("DEMUCS_DEVICE", "cpu")
    monkeypatch.setenv("DEMUCS_BACKEND", "torch")
    for folder, no_drums, want in ((only_rofo, "false", {ROFO_B}),
                                   (both, "true", {ROFO_B, MODEL_NAME})):
        monkeypatch.setenv("DEMUCS_MODEL_REPO", str(folder))
        monkeypatch.setenv("GENERATE_NO_DRUMS_VARIANT", no_drums)
        monkeypatch.setenv("SEPARATOR_PORT", str(free_port()))
        client = SeparatorClient.from_settings(load_settings())
        client.ensure_running(preload=True)
        try:
            health = client.health()
            assert {m["name"] for m in health["models"]} == want, health
        finally:
            stop_separator(client.port)


def test_switching_models_releases_the_old_one_from_the_service(repo, source_m4a, tmp_path,
                                                                monkeypatch):
    """A long-lived separation service keeps the models its tracks plan, not every model it
    ever loaded: after INSTRUMENTAL_MODEL switches from A to B, the next separation drops A
    (its memory handed back) and keeps B and the demucs model."""
    from conftest import stop_separator
    from dagster_server import free_port
    from imaker.separator.client import SeparatorClient

    monkeypatch.setenv("IMAKER_ENV_FILE", "")
    monkeypatch.setenv("DEMUCS_MODEL", MODEL_NAME)
    monkeypatch.setenv("DEMUCS_DEVICE", "cpu")
    monkeypatch.setenv("SEPARATOR_PORT", str(free_port()))
    seen = []
    try:
        for name in (ROFO_A, ROFO_B):
            monkeypatch.setenv("INSTRUMENTAL_MODEL", name)
            client = SeparatorClient.from_settings(load_settings())
            client.ensure_running()
            meta = client.separate(f"switch_{name}", source_m4a, tmp_path / name)
            assert [m["name"] for m in meta["models"]] == [name, MODEL_NAME], meta
            seen.append({m["name"] for m in client.health()["models"]})
    finally:
        stop_separator(client.port)
    assert seen == [{ROFO_A, MODEL_NAME}, {ROFO_B, MODEL_NAME}]
