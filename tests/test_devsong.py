"""Songs with known stems (imaker dev-song): composed from a seed, each stem rendered by
FluidSynth with pretty-midi's GM soundfont. Real rendering, real files read back, and one
generated song through the whole pipeline (tiny demucs model, real Dagster and ffmpeg)."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imaker import audio, devsong
from imaker.bundle import JobBundle, JobManifest, schema_errors
from imaker.settings import load_settings
from test_pipeline import _materialize  # one way to run a track in-process

SR = devsong.SAMPLE_RATE
FILES = ["mixture.wav", *(f"{s}.wav" for s in devsong.SOURCES), "song.mid", "song.json"]


def _imaker() -> list[str]:
    exe = Path(sys.executable).with_name("imaker")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "imaker.cli"]


def _db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-20)


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("devsong") / "song"
    devsong.write_song(folder, seed=11, seconds=16.0)
    return folder


def test_the_stems_sum_to_the_mixture_and_each_is_audible_distinct_and_stereo(song):
    assert sorted(p.name for p in song.iterdir()) == sorted(FILES)
    stems = {}
    for name in devsong.SOURCES:
        stems[name], rate = devsong.read_wav(song / f"{name}.wav")
        assert rate == SR and stems[name].shape == (16 * SR, 2)
        assert stems[name].dtype == np.float32
    mixture, rate = devsong.read_wav(song / "mixture.wav")
    assert rate == SR and mixture.shape == (16 * SR, 2)
    # ffmpeg reads the files as written (a standard float WAV, not just our own reader's)
    assert np.array_equal(audio.decode(song / "mixture.wav", SR, 2).T, mixture)

    total = sum(s.astype(np.float64) for s in stems.values())
    assert np.max(np.abs(total - mixture)) < 1e-4
    # one common gain: the mixture peaks at -1 dBFS, no stem above it, nothing clips
    assert abs(20 * np.log10(np.max(np.abs(mixture))) - (-1.0)) < 0.01
    assert all(np.max(np.abs(s)) <= 10 ** (-1 / 20) + 1e-6 for s in stems.values())

    fade = int(2 * SR * 16 / 20)  # the last seconds fade out (seconds / 10, at most 2 s)
    for name, s in stems.items():
        assert _db(s) > -40, name
        # audible all through the song, not in one burst: every 2 s window before the fade
        windows = [_db(s[i:i + 2 * SR]) for i in range(0, len(s) - fade - 2 * SR + 1, 2 * SR)]
        assert len(windows) >= 6 and min(windows) > -40, (name, windows)
        # placed in the stereo field: the two channels are not the same signal
        assert np.max(np.abs(s[:, 0] - s[:, 1])) > 1e-3, name
        assert np.corrcoef(s[:, 0], s[:, 1])[0, 1] < 0.9999, name
    for a, b in itertools.combinations(devsong.SOURCES, 2):
        corr = np.corrcoef(stems[a].ravel(), stems[b].ravel())[0, 1]
        assert abs(corr) < 0.3, (a, b, corr)

    info = json.loads((song / "song.json").read_text())
    assert info["seed"] == 11 and info["seconds"] == 16.0 and info["frames"] == 16 * SR
    assert info["soundfont"] == "TimGM6mb.sf2" and info["gain_db"] > -60
    kinds = {p["stem"] for p in info["parts"]}
    assert kinds == set(devsong.SOURCES)
    drums = [p for p in info["parts"] if p["stem"] == "drums"]
    assert drums and all(p["is_drum"] for p in drums)


def test_the_composition_follows_the_seed_and_fills_any_length():
    a, b = devsong.compose(3, 95.0), devsong.compose(3, 95.0)
    assert a.describe() == b.describe()
    assert [[vars(n) for n in p.notes] for p in a.parts] == \
        [[vars(n) for n in p.notes] for p in b.parts]
    other = devsong.compose(4, 95.0)
    assert [[vars(n) for n in p.notes] for p in other.parts] != \
        [[vars(n) for n in p.notes] for p in a.parts]
    # sections repeat until the end; every part plays in the last 10 s and nothing after the end
    kinds = [s["kind"] for s in a.sections]
    assert kinds[:3] == ["verse", "chorus", "verse"] and len(kinds) >= 4
    for part in a.parts:
        assert part.notes and max(n.end for n in part.notes) <= 95.0
        assert any(n.start > 85.0 for n in part.notes), part.name
    # drums: GM percussion keys (kick, snare) on the drum channel
    kit = next(p for p in a.parts if p.name == "kit")
    assert kit.is_drum and kit.channel == 9 and {36, 38} <= {n.pitch for n in kit.notes}
    with pytest.raises(devsong.DevSongError):
        devsong.compose(0, 0)


def test_the_same_seed_gives_the_same_bytes_another_seed_other_music(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # in another process (the CLI, stems rendered in threads from its first synth on:
    # FluidSynth's global set-up is not thread-safe) and here, one stem after another
    subprocess.run([*_imaker(), "dev-song", str(tmp_path / "cli"), "--seconds", "4",
                    "--seed", "5", "--workers", "4"], check=True, env=env, capture_output=True)
    devsong.write_song(tmp_path / "here", seed=5, seconds=4.0)
    devsong.write_song(tmp_path / "seed6", seed=6, seconds=4.0)
    first = tmp_path / "cli" / devsong.song_name(5)
    for name in FILES:
        assert (first / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    for name in ["mixture.wav", *(f"{s}.wav" for s in devsong.SOURCES)]:
        assert (first / name).read_bytes() != (tmp_path / "seed6" / name).read_bytes(), name
    # a different seed is different music, not the same audio at another level
    a = devsong.read_wav(first / "mixture.wav")[0].ravel()
    b = devsong.read_wav(tmp_path / "seed6" / "mixture.wav")[0].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.3


def test_cli_writes_songs_and_queues_them_as_bundles(tmp_path):
    queue = tmp_path / "queues" / "other"
    proc = subprocess.run([*_imaker(), "dev-song",
                           str(tmp_path / "songs"), "--seconds", "3", "--seed", "20", "--count",
                           "2", "--processes", "2", "--prefix", "bench", "--queue", str(queue),
                           "--format", "m4a"],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "songs").iterdir()) == ["bench_0020", "bench_0021"]
    assert proc.stdout.count("\n") == 2 and "bench_0020" in proc.stdout
    assert sorted(p.name for p in queue.iterdir() if not p.name.startswith(".")) == \
        ["job_bench_0020", "job_bench_0021"]
    for seed in (20, 21):
        folder = tmp_path / "songs" / f"bench_{seed:04d}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
        bundle = JobBundle.load(queue / f"job_bench_{seed:04d}")
        assert bundle.job_id == f"bench_{seed:04d}" and bundle.audio == "audio.m4a"
        data = json.loads((queue / f"job_bench_{seed:04d}" / "job.json").read_text())
        assert data["devsong"]["seed"] == seed
        assert Path(data["devsong"]["folder"]) == folder.resolve()
        probe = audio.probe(queue / f"job_bench_{seed:04d}" / "audio.m4a")
        assert abs(probe["duration_s"] - 3.0) < 0.05
    bad = subprocess.run([*_imaker(), "dev-song",
                          str(tmp_path / "x"), "--seconds", "0"], capture_output=True, text=True)
    assert bad.returncode == 1 and "seconds must be positive" in bad.stderr


def test_a_generated_song_through_the_whole_pipeline(imaker_env, tmp_path):
    seconds = 10.0
    folder = devsong.generate(tmp_path / "songs", seed=2, seconds=seconds)[0]
    settings = load_settings()
    devsong.queue_song(folder, settings.paths.queue_other, title="Generated", artist="Dev Song")
    job_id = folder.name
    result, settings = _materialize(job_id)
    assert result.success
    out = settings.paths.outputs_dir / job_id
    data = json.loads((out / "manifest.json").read_text())
    assert schema_errors("manifest", data) == []
    assert abs(data["provenance"]["source"]["duration_s"] - seconds) <= 0.05
    man = JobManifest.load(out)
    arts = {a.variant: a for a in man.artifacts if a.kind == "audio"}
    assert sorted(arts) == ["instrumental", "no_drums"]
    for art in arts.values():
        path = out / art.path
        assert path.is_file() and path.name.startswith("Dev Song - Generated")
        assert abs(audio.probe(path)["duration_s"] - seconds) <= 0.05
    # the stored source is the generated mixture (FLAC bundle: lossless up to 24 bits)
    mixture = devsong.read_wav(folder / "mixture.wav")[0]
    source = audio.decode(settings.paths.library_dir / job_id / "source.flac", SR, 2).T
    assert source.shape == mixture.shape
    assert np.max(np.abs(source - mixture)) < 1e-4
    assert (settings.paths.archive_dir / "done" / f"job_{job_id}" / "job.json").is_file()
