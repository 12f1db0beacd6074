import numpy as np
import pytest
from mutagen import File as MutagenFile

from imaker import audio
from imaker.fsutil import safe_filename
from imaker.pipeline import track_basename
from imaker.variants import PEAK_CEILING, VARIANTS, selected_variants
from oracles import codec_name, mix


def _tone(seconds=1.0, rate=44100, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([amp * np.sin(2 * np.pi * 440 * t), amp * np.sin(2 * np.pi * 220 * t)]).astype(np.float32)


@pytest.mark.parametrize("fmt", ["m4a", "mp3", "flac"])
def test_encode_tag_probe_decode_round_trip(tmp_path, fmt, cover_jpg):
    wav = _tone()
    dest = tmp_path / f"AC_DC - Song{audio.extension(fmt)}"
    tags = audio.Tags("AC/DC", "Song (no drum)", "YTDL", cover_jpg, job_id="j1", variant="no_drums")
    audio.encode(wav, 44100, dest, fmt, "192k", tags)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]  # no temp file left behind
    info = audio.probe(dest)
    assert info["audio"] == {"codec": codec_name(fmt), "sample_rate": 44100, "channels": 2}
    assert abs(info["duration_s"] - 1.0) < 0.05
    back = audio.decode(dest, 44100, 2)
    assert abs(back.shape[1] - wav.shape[1]) < 0.05 * 44100
    easy = MutagenFile(dest, easy=True)
    assert easy["artist"] == ["AC/DC"] and easy["title"] == ["Song (no drum)"]
    assert easy["album"] == ["YTDL"]
    raw = MutagenFile(dest)
    if fmt == "m4a":
        assert bytes(raw.tags["----:com.apple.iTunes:IMAKER_JOB_ID"][0]) == b"j1"
        assert bytes(raw.tags["covr"][0]) == cover_jpg.read_bytes()
    elif fmt == "mp3":
        assert raw.tags["TXXX:IMAKER_JOB_ID"].text == ["j1"]
        assert raw.tags["APIC:Cover"].data == cover_jpg.read_bytes()
    else:
        assert raw["IMAKER_JOB_ID"] == ["j1"]
        assert raw.pictures[0].data == cover_jpg.read_bytes()
    if fmt == "flac":  # lossless: samples survive to 24-bit precision
        assert np.max(np.abs(back - wav)) < 1e-6


def test_undecodable_audio_is_a_clear_error(tmp_path):
    bad = tmp_path / "audio.m4a"
    bad.write_bytes(b"this is not audio" * 100)
    with pytest.raises(audio.AudioError, match="cannot (decode|read) audio.m4a"):
        audio.decode(bad, 44100, 2)


def test_failed_encode_leaves_no_file(tmp_path):
    with pytest.raises(audio.AudioError):
        audio.encode(_tone(), 44100, tmp_path / "x.m4a", "m4a", bitrate="not-a-bitrate")
    assert list(tmp_path.iterdir()) == []


def test_safe_names():
    assert track_basename("AC/DC", "Back in Black") == "AC_DC - Back in Black"
    assert safe_filename("../../etc") == "_.._etc"
    assert "/" not in track_basename("a/b", "c\\d:e*f?\x00")
    assert len(track_basename("x" * 1000, "y" * 1000).encode()) <= 200
    assert safe_filename("...") == "Unknown"


def test_variant_table_and_selection():
    assert selected_variants(None, no_drums=True, drums_only=False) == ["instrumental", "no_drums"]
    assert selected_variants(None, no_drums=False, drums_only=True) == ["instrumental", "drums_only"]
    assert selected_variants(["drums_only"], no_drums=False, drums_only=False) == ["instrumental", "drums_only"]
    four = ["drums", "bass", "other", "vocals"]
    six = four + ["guitar", "piano"]
    assert VARIANTS["instrumental"].stems_for(four) == ["drums", "bass", "other"]
    assert VARIANTS["no_drums"].stems_for(six) == ["bass", "other", "guitar", "piano"]
    assert VARIANTS["drums_only"].stems_for(six) == ["drums"]


def test_mix_is_the_sum_of_stems_and_never_clips():
    rng = np.random.default_rng(0)
    stems = {n: (0.1 * rng.standard_normal((2, 1000))).astype(np.float32)
             for n in ("drums", "bass", "other", "vocals")}
    out, gain = mix(stems, VARIANTS["no_drums"])
    assert gain == 1.0
    np.testing.assert_allclose(out, stems["bass"] + stems["other"], rtol=1e-6)
    loud = {n: s * 20 for n, s in stems.items()}
    out, gain = mix(loud, VARIANTS["instrumental"])
    total = loud["drums"] + loud["bass"] + loud["other"]
    assert gain < 1.0
    assert np.max(np.abs(out)) == pytest.approx(PEAK_CEILING, rel=1e-5)
    np.testing.assert_allclose(out, total * gain, rtol=1e-5)  # one constant gain, no limiter
