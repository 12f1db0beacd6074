"""Catalog contents, variant backfill without separation, and forgetting a track."""

import os
import shutil

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance

from conftest import imaker_env_at, stop_separator, write_bundle
from imaker import cli
from imaker.bundle import JobManifest
from imaker.settings import load_settings
from imaker_assets import operations


def _stop_separator(settings) -> None:
    stop_separator(settings.service.port)


@pytest.fixture(scope="module")
def _ingested(tmp_path_factory, model_repo, source_m4a, cover_jpg):
    """Two tracks ingested once for the module (a real `ingest_once`), then kept pristine:
    each test gets its own copy at the same paths (``two_tracks``)."""
    from dagster_server import free_port

    root = tmp_path_factory.mktemp("two_tracks")
    with pytest.MonkeyPatch.context() as mp:
        imaker_env_at(mp, root, model_repo)
        mp.setenv("SEPARATOR_PORT", str(free_port()))
        settings = load_settings()
        write_bundle(settings.paths.queue_youtube_audio, "t1", source_m4a, cover=cover_jpg,
                     youtube={"video_id": "v1", "url": "https://www.youtube.com/watch?v=v1"})
        write_bundle(settings.paths.queue_other, "t2", source_m4a, artist="Other", title="Second",
                     source_type="local")
        assert operations.ingest_once(DagsterInstance.get(), settings) == 0
        _stop_separator(settings)
    pristine = root.with_name(root.name + "-pristine")
    shutil.copytree(root, pristine, symlinks=True)
    return root, pristine


@pytest.fixture
def two_tracks(_ingested, _private_separator, monkeypatch, model_repo):
    """The module's two ingested tracks, restored to their state after the ingest (the
    Dagster instance, outputs, library, stems and archive: every path as it was)."""
    root, pristine = _ingested
    shutil.rmtree(root)
    shutil.copytree(pristine, root, symlinks=True)
    port = os.environ["SEPARATOR_PORT"]  # this test's private service
    imaker_env_at(monkeypatch, root, model_repo)
    monkeypatch.setenv("SEPARATOR_PORT", port)
    return load_settings(), DagsterInstance.get()


class _Separations:
    """Counts the separations a private separation service completes (its /health)."""

    def __init__(self, client):
        self.client = client
        self.start = client.health()["completed"]

    def __len__(self):
        return self.client.health()["completed"] - self.start


@pytest.fixture
def separator_calls(two_tracks):
    from imaker.separator.client import SeparatorClient

    client = SeparatorClient.from_settings(load_settings())
    client.ensure_running()  # this test's private service (the ingest's was stopped)
    return _Separations(client)


@pytest.fixture(autouse=True)
def _private_separator(imaker_env, monkeypatch):
    """Each test its own separation service (after imaker_env, which clears SEPARATOR_PORT):
    the count of separations is this test's alone, and stopping it disturbs no other test."""
    from dagster_server import free_port

    monkeypatch.setenv("SEPARATOR_PORT", str(free_port()))
    yield
    _stop_separator(load_settings())


def _catalog(settings):
    return pd.read_csv(settings.paths.outputs_dir / "catalog.csv", keep_default_na=False)


def test_catalog_lists_every_track_from_manifests(two_tracks):
    settings, instance = two_tracks
    df = _catalog(settings).set_index("job_id")
    assert sorted(df.index) == ["t1", "t2"]
    assert df.loc["t1", "artist"] == "AC/DC" and df.loc["t2", "title"] == "Second"
    assert df.loc["t1", "source_url"] == "https://www.youtube.com/watch?v=v1"
    assert df.loc["t2", "source_type"] == "local"
    assert df.loc["t1", "variants"] == "instrumental,no_drums"
    assert df.loc["t1", "model"] == "tiny_htdemucs" and bool(df.loc["t1", "stems_kept"])
    assert df.loc["t1", "nas_sync"] == "not synced"
    assert abs(float(df.loc["t1", "duration_s"]) - 3.0) < 0.1
    event = instance.get_latest_materialization_event(AssetKey("catalog"))
    meta = event.asset_materialization.metadata
    assert meta["dagster/row_count"].value == 2
    assert {r.data["job_id"] for r in meta["tracks"].value.records} == {"t1", "t2"}
    # the library page beside catalog.csv, linked through the media server
    assert meta["library_page"].value == f"{settings.media.base_url}/"
    page = (settings.paths.outputs_dir / "index.html").read_text()
    assert 'id="t1"' in page and 'id="t2"' in page
    assert "library/t1/source.flac" in page and "outputs/t1/files/audio/AC_DC%20-%20Test%20Song.m4a" in page


def test_backfill_adds_a_variant_without_separating(two_tracks, separator_calls, monkeypatch, capsys):
    settings, _ = two_tracks
    assert cli.main(["backfill", "--variants", "drums_only"]) == 0
    assert len(separator_calls) == 0
    for job_id, base in (("t1", "AC_DC - Test Song"), ("t2", "Other - Second")):
        assert (settings.paths.outputs_dir / job_id / "files" / "audio" / f"{base} (drums only).m4a").is_file()
        man = JobManifest.load(settings.paths.outputs_dir / job_id)
        assert [a.variant for a in man.artifacts] == ["instrumental", "no_drums", "drums_only"]
    assert set(_catalog(settings)["variants"]) == {"instrumental,no_drums,drums_only"}


def test_backfill_after_stems_were_purged_separates_first_visibly(two_tracks, separator_calls, capsys):
    settings, _ = two_tracks
    shutil.rmtree(settings.paths.stems_dir / "t2")
    capsys.readouterr()
    assert cli.main(["backfill", "--variants", "drums_only"]) == 0
    out = capsys.readouterr().out
    assert "t2: stems were purged: separating again first" in out
    assert len(separator_calls) == 1  # only t2, once
    assert (settings.paths.stems_dir / "t2" / "stems.json").is_file()


def test_unknown_backfill_variant_is_refused(two_tracks, capsys):
    assert cli.main(["backfill", "--variants", "karaoke"]) == 2
    assert "unknown variant" in capsys.readouterr().err


def test_forget_removes_partition_and_stems_and_keeps_catalog_consistent(two_tracks):
    settings, instance = two_tracks
    assert cli.main(["forget", "t2"]) == 0
    assert instance.get_dynamic_partitions("tracks") == ["t1"]
    assert not (settings.paths.stems_dir / "t2").exists()
    assert not (settings.paths.library_dir / "t2").exists()
    assert (settings.paths.outputs_dir / "t2" / "manifest.json").is_file()  # kept without --outputs
    assert list(_catalog(settings)["job_id"]) == ["t1"]
    page = (settings.paths.outputs_dir / "index.html").read_text()   # the page follows the catalog
    assert 'id="t1"' in page and 'id="t2"' not in page
    assert cli.main(["forget", "t1", "--outputs"]) == 0
    assert not (settings.paths.outputs_dir / "t1").exists()
    assert len(_catalog(settings)) == 0
    assert (settings.paths.archive_dir / "done" / "job_t1").is_dir()  # the original bundle is kept


def test_ingest_then_nas_copy_places_files_by_route_and_the_catalog_shows_it(
        imaker_env, source_m4a, tmp_path, monkeypatch):
    nas = tmp_path / "nas"
    (nas / "Instrumentals").mkdir(parents=True)
    config = tmp_path / "nas.yaml"
    config.write_text(f"""
nasSync:
  enabled: true
  remoteRoots:
    audio: "{nas / 'Instrumentals'}"
  routes:
    - match: {{ kind: "audio", variant: "instrumental" }}
      to: "${{remoteRoots.audio}}/Instrumental"
    - match: {{ kind: "audio", variant: "no_drums" }}
      to: "${{remoteRoots.audio}}/NoDrums"
""")
    monkeypatch.setenv("NAS_SYNC_ENABLED", "true")
    monkeypatch.setenv("NAS_SYNC_CONFIG_PATH", str(config))
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "synced", source_m4a)
    assert cli.main(["ingest", "--once"]) == 0
    inst = nas / "Instrumentals" / "Instrumental" / "AC_DC - Test Song.m4a"
    nodrum = nas / "Instrumentals" / "NoDrums" / "AC_DC - Test Song (no drum).m4a"
    out = settings.paths.outputs_dir / "synced" / "files" / "audio"
    assert inst.read_bytes() == (out / "AC_DC - Test Song.m4a").read_bytes()
    assert nodrum.read_bytes() == (out / "AC_DC - Test Song (no drum).m4a").read_bytes()
    assert _catalog(settings).set_index("job_id").loc["synced", "nas_sync"] == "ok"
