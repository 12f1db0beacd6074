"""Streaming decode/encode and the two-pass streaming mixer of the variants stage: the same
audio as the whole-track path (decode, ``mix``, encode) in bounded memory, and no file
under a final name when anything fails. Real ffmpeg, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from mutagen import File as MutagenFile

from conftest import make_audio
from imaker import analysis, audio
from imaker.fsutil import sha256_file
from imaker.pipeline import Library, make_variants
from imaker.settings import Output
from imaker.variants import PEAK_CEILING, VARIANTS, StemLengthError, stream_mix, stream_peaks
import oracles
from oracles import load_stems, mix

RATE = 44100
LSB24 = 2.0**-23  # one step of a 24-bit FLAC sample
STEM_NAMES = ("drums", "bass", "other", "vocals")


def _ffmpeg_children() -> list[int]:
    """ffmpeg processes (running, or dead but not reaped) whose parent is this process."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == os.getpid() and comm == "ffmpeg":
            found.append(int(entry.name))
    return found


def _stems(seconds: float, *, loud: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Four float32 stereo stems; ``loud``: the instrumental sum peaks well above -1 dBFS."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    amp = 0.3 if loud else 0.05

    def tone(freq: float, a: float) -> np.ndarray:
        return np.stack([a * np.sin(2 * np.pi * freq * t), a * np.sin(2 * np.pi * freq * t + 1)])

    stems = {"drums": np.clip(amp * rng.standard_normal((2, n)), -0.6, 0.6),
             "bass": tone(55, 2 * amp), "other": np.clip(amp * rng.standard_normal((2, n)), -0.6, 0.6),
             "vocals": tone(880, amp)}
    return {k: v.astype(np.float32) for k, v in stems.items()}


def _store(folder: Path, stems: dict[str, np.ndarray], scale: float) -> dict[str, Path]:
    """Stems as the stems stage stores them: 24-bit FLAC of ``stem * scale``."""
    paths = {}
    for name, data in stems.items():
        paths[name] = audio.encode(data * scale, RATE, folder / f"{name}.flac", "flac").dest
    return paths


def _loaded(paths: dict[str, Path], scale: float) -> dict[str, np.ndarray]:
    """What ``oracles.load_stems`` gives ``mix``: the decoded stems divided by the scale."""
    return {name: audio.decode(path, RATE, 2) / scale for name, path in paths.items()}


# ----- streaming decode ------------------------------------------------------------------
@pytest.mark.parametrize("chunk_frames", [1000, 4096, 10 * RATE])
def test_iter_decode_equals_decode_sample_exactly(source_m4a, chunk_frames):
    whole = audio.decode(source_m4a, RATE, 2)
    chunks = list(audio.iter_decode(source_m4a, RATE, 2, chunk_frames=chunk_frames))
    assert all(c.dtype == np.float32 and c.flags.c_contiguous and c.shape[0] == 2 for c in chunks)
    assert all(c.shape[1] == chunk_frames for c in chunks[:-1])
    assert 0 < chunks[-1].shape[1] <= chunk_frames
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), whole)
    # resampled + downmixed, like decode
    mono = np.concatenate(list(audio.iter_decode(source_m4a, 22050, 1, chunk_frames=777)), axis=1)
    np.testing.assert_array_equal(mono, audio.decode(source_m4a, 22050, 1))
    assert not _ffmpeg_children()


def test_iter_decode_errors_are_decodes(tmp_path):
    bad = tmp_path / "audio.m4a"
    bad.write_bytes(b"this is not audio" * 100)
    with pytest.raises(audio.AudioError, match="cannot (decode|read) audio.m4a"):
        next(audio.iter_decode(bad, RATE, 2))
    raw = tmp_path / "nan.raw"
    samples = np.zeros((3000, 2), "<f4")
    samples[2500, 1] = np.nan
    raw.write_bytes(samples.tobytes())
    nan = tmp_path / "nan.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "f32le", "-ar", str(RATE), "-ac", "2",
                    "-i", str(raw), "-c:a", "pcm_f32le", str(nan)], check=True)
    with pytest.raises(audio.AudioError, match="nan.wav decodes to non-finite samples"):
        audio.decode(nan, RATE, 2)
    with pytest.raises(audio.AudioError, match="nan.wav decodes to non-finite samples"):
        list(audio.iter_decode(nan, RATE, 2, chunk_frames=1000))
    assert not _ffmpeg_children()


def test_iter_decode_stopped_early_kills_ffmpeg(tmp_path):
    long = make_audio(tmp_path / "long.m4a", 20.0)  # ffmpeg decodes it (not a stored FLAC)
    it = audio.iter_decode(long, RATE, 2, chunk_frames=1024)
    assert next(it).shape == (2, 1024)
    assert _ffmpeg_children()  # still decoding (blocked on its full pipe)
    it.close()
    assert not _ffmpeg_children()
    with pytest.raises(RuntimeError, match="stop"):
        for _chunk in audio.iter_decode(long, RATE, 2, chunk_frames=1024):
            raise RuntimeError("stop")
    assert not _ffmpeg_children()


def test_decode_into_scratch_maps_the_same_samples_from_an_unnamed_file(source_m4a, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    whole = audio.decode(source_m4a, RATE, 2)
    mapped = audio.decode(source_m4a, RATE, 2, scratch=scratch)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    assert mapped.shape == whole.shape and mapped.flags.c_contiguous
    np.testing.assert_array_equal(mapped, whole)
    mono = audio.decode(source_m4a, 22050, 1, scratch=scratch)
    np.testing.assert_array_equal(mono, audio.decode(source_m4a, 22050, 1))
    assert list(scratch.iterdir()) == []  # unnamed: nothing to clean up after a crash
    mapped *= np.float32(0.5)  # writable in place (the separation normalises in place)
    np.testing.assert_array_equal(mapped, whole * np.float32(0.5))
    assert not _ffmpeg_children()


def test_decode_into_scratch_holds_no_whole_track_in_memory(tmp_path):
    seconds = 120
    src = make_audio(tmp_path / "long.flac", seconds)
    whole_track = seconds * RATE * 2 * 4  # 42 MB of float32 stereo
    peaks = {}
    for label, scratch in (("memory", None), ("scratch", tmp_path)):
        tracemalloc.start()  # numpy reports its array buffers to tracemalloc
        try:
            wav = audio.decode(src, RATE, 2, scratch=scratch)
            peak, rms = audio.peak_rms(wav)
            peaks[label] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert wav.shape == (2, seconds * RATE)
        assert 0.2 < peak < 1.0 and rms > 0.05
        del wav
    # the in-memory decode holds the track (and more while gathering it): the measure works
    assert peaks["memory"] > whole_track, peaks
    assert peaks["scratch"] < whole_track / 4, peaks  # a few 2 MiB chunks (7 MB)


def test_decode_into_scratch_names_a_full_disk(source_m4a, tmp_path):
    """Writing the decoded samples fails (here a file size limit, as a full disk or a quota
    would): one readable reason, naming the folder; no ffmpeg left behind."""
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from imaker import audio\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    audio.decode(Path(sys.argv[1]), 44100, 2, scratch=Path(sys.argv[2]))\n"
        "except audio.AudioError as exc:\n"
        "    print(exc)\n"
        "import os\n"
        "kids = [p for p in os.listdir('/proc') if p.isdigit() and\n"
        "        open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1] == str(os.getpid())]\n"
        "print('children', len(kids))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(source_m4a), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"cannot decode audio.m4a: writing its samples to {tmp_path} failed: File too large",
        "children 0"]  # no ffmpeg left behind
    assert list(tmp_path.iterdir()) == []


def _ffmpeg_samples(path: Path, rate: int = RATE, channels: int = 2) -> np.ndarray:
    """ffmpeg's own decode of ``path`` (the reference the in-process reader must equal)."""
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le",
                          "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(rate), "pipe:1"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, "<f4").reshape(-1, channels).T


FLAC_BITS = {16: ["-c:a", "flac", "-sample_fmt", "s16"],
             24: ["-c:a", "flac", "-sample_fmt", "s32", "-bits_per_raw_sample", "24"]}


@pytest.mark.parametrize("bits", sorted(FLAC_BITS))
def test_a_stored_flac_is_read_in_this_process_as_ffmpeg_reads_it(tmp_path, monkeypatch, bits):
    """The stored source and stems (FLAC at the pipeline's rate and channels) are read by
    libsndfile in this process: the same samples as ffmpeg's decode, no ffmpeg started.
    An input from outside (``stored=False``, the default) is read by ffmpeg."""
    path = make_audio(tmp_path / "stem.flac", 7.0, fmt_args=FLAC_BITS[bits])
    want = _ffmpeg_samples(path)
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or real_popen(*a, **k))
    chunks = list(audio.iter_decode(path, RATE, 2, chunk_frames=50_000, stored=True))
    whole = audio.decode(path, RATE, 2, stored=True)
    assert started == []
    np.testing.assert_array_equal(audio.decode(path, RATE, 2), want)
    assert len(started) == 1 and started[0][0][0].endswith("ffmpeg")
    monkeypatch.undo()
    assert [c.shape[1] for c in chunks[:-1]] == [50_000] * (len(chunks) - 1)
    assert all(c.flags.c_contiguous and c.dtype == np.float32 for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), want)
    np.testing.assert_array_equal(whole, want)
    # another rate or channel count: ffmpeg converts it, as it does any input
    np.testing.assert_array_equal(audio.decode(path, 22050, 1, stored=True),
                                  _ffmpeg_samples(path, 22050, 1))
    # a FLAC written as a stream has no length in its header, which libsndfile cannot read:
    # ffmpeg decodes it
    streamed = tmp_path / "streamed.flac"
    with open(streamed, "wb") as out:
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-c:a", "flac",
                        "-f", "flac", "pipe:1"], stdout=out, check=True)
    np.testing.assert_array_equal(audio.decode(streamed, RATE, 2, stored=True), want)


def test_a_stored_flac_that_is_cut_short_or_damaged_is_an_error(tmp_path):
    path = make_audio(tmp_path / "cut.flac", 10.0, fmt_args=FLAC_BITS[24])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(audio.AudioError, match="^cannot decode cut.flac: "):
        list(audio.iter_decode(path, RATE, 2, stored=True))
    damaged = bytearray(data)
    damaged[len(data) // 2: len(data) // 2 + 5000] = bytes(5000)
    path.write_bytes(bytes(damaged))
    with pytest.raises(audio.AudioError, match="^cannot decode cut.flac: "):
        audio.decode(path, RATE, 2, stored=True)
    path.write_bytes(b"fLaC" + bytes(100))  # not a FLAC stream: ffmpeg says why
    with pytest.raises(audio.AudioError, match="^cannot decode cut.flac: "):
        audio.decode(path, RATE, 2, stored=True)


def test_flac_writer_publishes_a_24_bit_file_or_nothing(tmp_path):
    import soundfile

    wav = audio.decode(make_audio(tmp_path / "in.wav", 3.0), RATE, 2)
    out = tmp_path / "out"
    with audio.FlacWriter(out / "stem.flac", RATE, 2) as writer:
        for start in range(0, wav.shape[1], 40_000):
            writer.write(wav[:, start:start + 40_000])
        assert not (out / "stem.flac").exists()  # only a temporary name while writing
    info = soundfile.info(str(out / "stem.flac"))
    assert (info.format, info.subtype, info.frames) == ("FLAC", "PCM_24", wav.shape[1])
    back = audio.decode(out / "stem.flac", RATE, 2, stored=True)
    assert np.abs(back - wav).max() <= LSB24 / 2  # rounded to the nearest 24-bit step
    np.testing.assert_array_equal(back, _ffmpeg_samples(out / "stem.flac"))
    with pytest.raises(RuntimeError, match="stop"):
        with audio.FlacWriter(out / "other.flac", RATE, 2) as writer:
            writer.write(wav[:, :1000])
            raise RuntimeError("stop")
    assert [p.name for p in out.iterdir()] == ["stem.flac"]  # no temporary left behind


def test_flac_writer_names_a_full_disk(tmp_path):
    code = (
        "import resource, signal, sys\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from imaker import audio\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "noise = (0.1 * np.random.default_rng(0).standard_normal((2, 441000))).astype('f4')\n"
        "try:\n"
        "    with audio.FlacWriter(Path(sys.argv[1]) / 'drums.flac', 44100, 2) as out:\n"
        "        out.write(noise)\n"
        "except audio.AudioError as exc:\n"
        "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"cannot encode {tmp_path / 'drums.flac'}: File too large"]
    assert list(tmp_path.iterdir()) == []


# ----- streaming encode ------------------------------------------------------------------
def test_encoder_chunks_equal_encode_and_are_tagged(tmp_path, cover_jpg):
    wav = _stems(2.0, loud=False)["bass"]
    audio.encode(wav, RATE, tmp_path / "whole.flac", "flac")
    tags = audio.Tags("AC/DC", "Song", "YTDL", cover_jpg, job_id="j1", variant="instrumental")
    dest = tmp_path / "out" / "chunked.flac"
    with audio.Encoder(dest, RATE, 2, "flac", tags=tags) as enc:
        for start in range(0, wav.shape[1], 12345):  # uneven chunks
            enc.write(wav[:, start:start + 12345])
        assert not dest.exists()  # only a temporary name while writing
    assert enc.frames == wav.shape[1]
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]
    np.testing.assert_array_equal(audio.decode(dest, RATE, 2), audio.decode(tmp_path / "whole.flac", RATE, 2))
    raw = MutagenFile(dest)
    assert raw["ARTIST"] == ["AC/DC"] and raw["IMAKER_VARIANT"] == ["instrumental"]
    assert raw.pictures[0].data == cover_jpg.read_bytes()
    assert not _ffmpeg_children()


@pytest.mark.parametrize("writes", [0, 1, 10])  # fails at the end, or while writing
def test_encoder_leaves_nothing_when_ffmpeg_fails(tmp_path, writes):
    chunk = _stems(1.0, loud=False)["bass"][:, :1000 if writes == 1 else None]
    with pytest.raises(audio.AudioError, match="cannot encode .*x.m4a: .*bit"):
        with audio.Encoder(tmp_path / "x.m4a", RATE, 2, "m4a", bitrate="not-a-bitrate") as enc:
            for _ in range(writes):
                enc.write(chunk)
    assert list(tmp_path.iterdir()) == []
    assert not _ffmpeg_children()


@pytest.mark.parametrize("fmt", ["flac", "m4a"])
def test_encoder_leaves_nothing_when_the_caller_fails_mid_write(tmp_path, fmt):
    chunk = _stems(1.0, loud=False)["bass"]
    dest = tmp_path / f"x{audio.extension(fmt)}"
    with pytest.raises(RuntimeError, match="boom"):
        with audio.Encoder(dest, RATE, 2, fmt) as enc:
            enc.write(chunk)
            enc.write(chunk)
            assert [p for p in tmp_path.iterdir() if ".part" in p.name]  # ffmpeg is writing
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert not _ffmpeg_children()
    with pytest.raises(ValueError, match=r"expected \(2, n\)"):  # wrong shape: nothing written
        with audio.Encoder(dest, RATE, 2, fmt) as enc:
            enc.write(chunk[:1])
    assert list(tmp_path.iterdir()) == []


def test_measure_file_streams_to_the_same_levels(tmp_path):
    for path in (make_audio(tmp_path / "a.flac", 15.0), make_audio(tmp_path / "b.m4a", 2.0)):
        info = audio.probe(path)
        rate, channels = info["audio"]["sample_rate"], info["audio"]["channels"]
        whole = audio.decode(path, rate, channels)
        measured = analysis.measure_file(path, rate, channels)
        assert measured == {**oracles.levels(whole),
                            "duration_s": round(whole.shape[1] / rate, 4)}


@pytest.mark.parametrize("fmt", ["flac", "m4a", "mp3"])
def test_the_encoder_measures_what_it_writes(tmp_path, fmt):
    """Levels, duration, loudness, sha256 and the waveform come from the encoding itself
    (one ffmpeg, the chunks in Python): they match what a decode of the file gives."""
    wav = _stems(4.0, loud=False)["bass"]
    tags = audio.Tags("AC/DC", "Song")
    dest = tmp_path / f"m{audio.extension(fmt)}"
    with audio.Encoder(dest, RATE, 2, fmt, tags=tags, measure=True, digest=True,
                       waveform="0xe0602f") as enc:
        for start in range(0, wav.shape[1], 10000):
            enc.write(wav[:, start:start + 10000])
    got = enc.measurements()
    assert got["frames"] == wav.shape[1] and got["duration_s"] == round(wav.shape[1] / RATE, 4)
    assert got["codec"] == audio.FORMATS[fmt][2] and (got["sample_rate"], got["channels"]) == (RATE, 2)
    assert {k: got[k] for k in ("peak_dbfs", "rms_dbfs")} == oracles.levels(
        wav.astype(np.float32))
    assert got["sha256"] == sha256_file(dest) and got["size_bytes"] == dest.stat().st_size
    assert got["mtime_ns"] == dest.stat().st_mtime_ns
    published = oracles.loudness(dest)  # the file's own loudness, by a decode of it
    assert abs(got["loudness_lufs"] - published["integrated_lufs"]) <= 0.1
    assert tags.replaygain["gain_db"] == round(-18.0 - got["loudness_lufs"], 2)
    assert enc.waveform.startswith(b"\x89PNG") and len(enc.waveform) > 200
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]  # no temporary file left
    assert not _ffmpeg_children()


# ----- streaming mixer ------------------------------------------------------------------
@pytest.mark.parametrize("loud", [True, False])
def test_stream_mix_equals_mix_within_24_bit(tmp_path, loud):
    scale = 0.8
    paths = _store(tmp_path / "stems", _stems(3.3, loud=loud), scale)
    stems = _loaded(paths, scale)
    specs = [VARIANTS[n] for n in ("instrumental", "no_drums", "drums_only")]
    outs = {spec: audio.Encoder(tmp_path / "out" / f"{spec.name}.flac", RATE, 2, "flac")
            for spec in specs}
    gains = stream_mix(paths, outs, samplerate=RATE, channels=2, scale=scale, chunk_frames=10000)
    for spec in specs:
        expected, gain = mix(stems, spec)
        assert gains[spec.name] == gain  # the same float32 sums, so the very same gain
        got = audio.decode(tmp_path / "out" / f"{spec.name}.flac", RATE, 2)
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= 2 * LSB24, spec.name
        assert np.max(np.abs(got)) <= PEAK_CEILING + 2 * LSB24
    if loud:
        assert gains["instrumental"] < 1.0 and gains["no_drums"] < 1.0
        assert gains["drums_only"] == 1.0
    else:
        assert set(gains.values()) == {1.0}
    peaks = stream_peaks(paths, specs, samplerate=RATE, channels=2, scale=scale)
    assert peaks == {s.name: float(np.max(np.abs(sum(stems[n] for n in s.stems_for(list(stems))))))
                     for s in specs}
    assert not _ffmpeg_children()


@pytest.mark.parametrize("seconds,bad_first", [(1.0, True), (0.05, False)])
def test_stream_mix_publishes_nothing_when_one_variant_fails(tmp_path, seconds, bad_first):
    # 1 s: ffmpeg's failure shows while writing; 0.05 s fits in the pipe, so it shows (at
    # the latest) when the encoders finish, the good one first: it must not be published
    paths = _store(tmp_path / "stems", _stems(seconds, loud=True), 0.8)
    out = tmp_path / "out"
    good = (VARIANTS["instrumental"], audio.Encoder(out / "i.flac", RATE, 2, "flac"))
    bad = (VARIANTS["drums_only"], audio.Encoder(out / "d.m4a", RATE, 2, "m4a", "not-a-bitrate"))
    outs = dict([bad, good] if bad_first else [good, bad])
    with pytest.raises(audio.AudioError, match="cannot encode .*d.m4a"):
        stream_mix(paths, outs, samplerate=RATE, channels=2, scale=0.8, chunk_frames=4096)
    assert list(out.iterdir()) == []
    assert not _ffmpeg_children()


def test_stream_mix_rejects_stems_of_different_lengths(tmp_path):
    stems = _stems(1.0, loud=False)
    stems["bass"] = stems["bass"][:, : RATE // 2]
    paths = _store(tmp_path / "stems", stems, 1.0)
    outs = {VARIANTS["instrumental"]: audio.Encoder(tmp_path / "out" / "i.flac", RATE, 2, "flac")}
    with pytest.raises(StemLengthError, match="stems differ in length: bass ended before drums, other"):
        stream_mix(paths, outs, samplerate=RATE, channels=2, chunk_frames=30000)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not _ffmpeg_children()


def _library(root: Path, stems: dict[str, np.ndarray], scale: float) -> Library:
    """A track as the source and stems stages leave it."""
    lib = Library(root / "library", root / "stems", root / "outputs")
    lib.track_dir("mixjob").mkdir(parents=True)
    (lib.track_dir("mixjob") / "job.json").write_text(json.dumps(
        {"schema_version": 1, "job_id": "mixjob", "source_type": "local", "title": "Song",
         "artist": "AC/DC", "album": "YTDL", "audio": "source.flac"}))
    _store(lib.stem_dir("mixjob"), stems, scale)
    (lib.stem_dir("mixjob") / "stems.json").write_text(json.dumps(
        {"job_id": "mixjob", "sources": list(stems), "scale": scale, "sample_rate": RATE,
         "channels": 2, "duration_s": 2.5}))
    return lib


def test_make_variants_pipeline_streams_the_same_records_and_audio(tmp_path):
    lib = _library(tmp_path, _stems(2.5, loud=True), 0.9)
    meta = make_variants(Output(no_drums=True, drums_only=True, audio_format="m4a"),
                         lib, "mixjob")
    stems, _ = load_stems(lib, "mixjob")
    assert [a["variant"] for a in meta["artifacts"]] == ["instrumental", "no_drums", "drums_only"]
    saved = json.loads((lib.track_dir("mixjob") / "variants.json").read_text())
    assert saved["artifacts"] == meta["artifacts"] and saved["format"] == "m4a"
    for art in meta["artifacts"]:
        spec = VARIANTS[art["variant"]]
        expected, gain = mix(stems, spec)  # the whole-track path of before
        assert art["gain_db"] == round(20 * np.log10(gain), 3)
        assert art["stems"] == spec.stems_for(list(stems)) and art["label"] == spec.label
        assert art["path"] == f"files/audio/AC_DC - Song{spec.suffix}.m4a"
        old = audio.encode(expected, RATE, tmp_path / "old.m4a", "m4a").dest
        got = audio.decode(lib.output_dir("mixjob") / art["path"], RATE, 2)
        np.testing.assert_allclose(got, audio.decode(old, RATE, 2), rtol=0, atol=1e-4)
        assert MutagenFile(lib.output_dir("mixjob") / art["path"], easy=True)["title"] == [
            spec.tagged_title("Song")] == [art["title_tag"]]
    assert meta["artifacts"][0]["gain_db"] < 0 and meta["artifacts"][2]["gain_db"] == 0.0
    assert not [p for p in lib.output_dir("mixjob").rglob("*") if ".part" in p.name]


def test_stream_mix_memory_is_bounded_on_a_10_minute_track(tmp_path):
    seconds = 600
    paths = {}
    for name, source in (("drums", "anoisesrc=color=white:amplitude=0.5:sample_rate=44100"),
                         ("bass", "sine=frequency=55:sample_rate=44100,volume=7")):
        paths[name] = tmp_path / f"{name}.flac"
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                        f"{source},aformat=channel_layouts=stereo", "-t", str(seconds),
                        *audio.FORMATS["flac"][1], str(paths[name])], check=True)
    whole_track = seconds * RATE * 2 * 4  # one float32 stereo array: 212 MB
    outs = {VARIANTS[n]: audio.Encoder(tmp_path / f"{n}.flac", RATE, 2, "flac")
            for n in ("instrumental", "drums_only")}
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    try:
        gains = stream_mix(paths, outs, samplerate=RATE, channels=2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert gains["instrumental"] < 1.0 and gains["drums_only"] == 1.0
    assert audio.probe(tmp_path / "instrumental.flac")["duration_s"] == pytest.approx(seconds, abs=0.05)
    # a few 2 MiB chunks per stem and per variant, against 2 x 212 MB for the stems alone
    # (and more per variant) when whole tracks are decoded
    assert peak < whole_track / 5, f"peak {peak / 2**20:.1f} MiB"
