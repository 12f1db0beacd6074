"""The oracle separation model (``imaker/oracle.py``, benchmark/test only): a generated song's
known stems, served by the separation service like any model (issue 22: the pipeline's
ceiling, ``benchmarks/bench_ceiling.py``)."""

import json

import numpy as np
import pytest

from imaker import audio, devsong, oracle, separation
from imaker.bundle import JobManifest
from imaker.settings import load_settings
from test_pipeline import _materialize

SR = devsong.SAMPLE_RATE
LSB24 = 2.0 ** -23  # one step of 24-bit FLAC


def _db(signal: np.ndarray, error: np.ndarray) -> float:
    return 10 * np.log10(np.sum(np.square(signal, dtype=np.float64))
                         / max(np.sum(np.square(error, dtype=np.float64)), 1e-30))


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_songs")
    return devsong.generate(root, count=2, seed=5, seconds=6.0)


def test_the_oracle_loads_by_name_and_finds_the_song_by_its_audio(songs, tmp_path):
    repo = tmp_path / "models"
    oracle.write_spec(repo, [songs[0].parent])
    loaded = separation.load_model("oracle", repo, "cpu")
    assert loaded.sources == ("drums", "bass", "other", "vocals")
    assert loaded.signature.startswith("oracle-")
    # the second song, from a lossless file and from AAC (a decode a few hundred frames longer)
    known = np.stack([devsong.read_wav(songs[1] / f"{s}.wav")[0].T for s in devsong.SOURCES])
    for fmt in ("flac", "m4a"):
        wav = audio.decode(devsong.encode_mixture(songs[1], tmp_path / f"mix.{fmt}"), SR, 2)
        chunks = []
        separation.separate(loaded, wav, sink=lambda start, c: chunks.append((start, c.copy())))
        got = np.concatenate([c for _, c in chunks], axis=-1)
        assert [s for s, _ in chunks] == list(range(0, wav.shape[1], oracle.CHUNK_FRAMES))
        assert got.shape == (4, 2, wav.shape[1])
        n = known.shape[-1]
        assert np.array_equal(got[..., :n], known) and not got[..., n:].any()
    # a source that is none of the songs: a clear error naming where it looked
    noise = np.random.default_rng(0).standard_normal(known.shape[1:]).astype(np.float32) * 0.1
    with pytest.raises(oracle.OracleError, match="knows no song matching this source.*dB"):
        separation.separate(loaded, noise, sink=lambda *a: None)


def test_a_generated_song_through_the_pipeline_with_the_oracle(songs, imaker_env, tmp_path,
                                                               monkeypatch):
    repo = tmp_path / "models"
    oracle.write_spec(repo, [songs[0].parent])
    monkeypatch.setenv("DEMUCS_MODEL", "oracle")
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(repo))
    settings = load_settings()
    song = songs[0]
    devsong.queue_song(song, settings.paths.queue_other, title="Oracle", artist="Dev Song")
    job_id = song.name
    result, settings = _materialize(job_id)
    assert result.success
    # the stems store holds the song's known stems, up to 24-bit quantisation
    stems_dir = settings.paths.stems_dir / job_id
    meta = json.loads((stems_dir / "stems.json").read_text())
    assert meta["model"] == "oracle" and meta["sources"] == list(devsong.SOURCES)
    assert meta["scale"] == 1.0  # the songs peak at -1 dBFS
    known = {s: devsong.read_wav(song / f"{s}.wav")[0].T for s in devsong.SOURCES}
    # each model's stems are stored in its own folder (stems/<job_id>/<model>/)
    for name, ref in known.items():
        stored = audio.decode(stems_dir / "oracle" / f"{name}.flac", SR, 2)
        assert stored.shape == ref.shape
        assert np.max(np.abs(stored - ref)) <= LSB24, name
    # and the variants are made from them: the instrumental is the song without its vocals
    out = settings.paths.outputs_dir / job_id
    arts = {a.variant: out / a.path for a in JobManifest.load(out).artifacts if a.kind == "audio"}
    assert sorted(arts) == ["instrumental", "no_drums"]
    inst = audio.decode(arts["instrumental"], SR, 2)
    n = min(inst.shape[1], known["drums"].shape[1])
    want = (known["drums"] + known["bass"] + known["other"])[:, :n]
    vocals = known["vocals"][:, :n]
    assert _db(want, inst[:, :n] - want) > 15  # AAC 256k of the known instrumental
    assert _db(want, inst[:, :n] - want) > _db(want, vocals) + 5  # the vocals are gone


def test_lossy_overshoot_is_a_warning_and_the_track_is_published(imaker_env, tmp_path,
                                                                 monkeypatch):
    """Seed 8's instrumental peaks at -1.4 dBFS (no anti-clipping gain); AAC 256k decodes
    its opening drum hit at about +0.8 dBFS. The mix did not clip: the clipping check says
    so as a warning, and the track is published (done/, not failed/)."""
    from dagster import AssetCheckSeverity, DagsterInstance

    from conftest import claim_tags
    from imaker_assets.definitions import build_defs

    song = devsong.generate(tmp_path / "songs", count=1, seed=8, seconds=4.0)[0]
    repo = tmp_path / "models"
    oracle.write_spec(repo, [song])
    monkeypatch.setenv("DEMUCS_MODEL", "oracle")
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(repo))
    settings = load_settings()
    devsong.queue_song(song, settings.paths.queue_other, title="Attack", artist="Dev Song")
    job_id = song.name
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions("tracks", [job_id])
    result = build_defs(settings).resolve_job_def("ingest_track").execute_in_process(
        partition_key=job_id, instance=instance, tags=claim_tags(job_id), raise_on_error=False)
    assert result.success
    [clip] = [e for e in result.get_asset_check_evaluations()
              if e.check_name == "variants_do_not_clip"]
    assert not clip.passed and clip.severity == AssetCheckSeverity.WARN, clip.description
    assert clip.description.startswith("lossy overshoot, not clipping") and \
        "instrumental" in clip.description
    levels = clip.metadata["details"].value
    assert levels["levels"]["instrumental"]["peak_dbfs"] > 0.0
    assert -1.5 < levels["sent_peak_dbfs"]["instrumental"] <= -1.0
    assert (settings.paths.archive_dir / "done" / f"job_{job_id}").is_dir()
    assert (settings.paths.outputs_dir / job_id / "manifest.json").is_file()
