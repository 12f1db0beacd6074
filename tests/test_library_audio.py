"""Library-ready files: tags that mark every version, the input's tags carried over,
ReplayGain 2.0 that matches the measured loudness, a silent source refused before
separation, and disk errors that name the file. Real ffmpeg, mutagen, demucs and Dagster."""

import json
import re
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
from mutagen import File as MutagenFile

from conftest import make_audio, write_bundle
from imaker import audio
from imaker.catalog import build_catalog
from imaker.pipeline import Library
from imaker.settings import load_settings
from imaker.variants import VARIANTS
import oracles
from oracles import load_stems, mix
from test_pipeline import _materialize  # one way to run a track in-process
from imaker_assets.assets import source_audio, stems

MBID = {"musicbrainz_trackid": "1f0e3dad-9990-4e1b-8a1c-6f3bd2a1e0aa",
        "musicbrainz_albumid": "2f0e3dad-9990-4e1b-8a1c-6f3bd2a1e0bb",
        "musicbrainz_artistid": "3f0e3dad-9990-4e1b-8a1c-6f3bd2a1e0cc",
        "musicbrainz_albumartistid": "4f0e3dad-9990-4e1b-8a1c-6f3bd2a1e0dd",
        "musicbrainz_releasegroupid": "5f0e3dad-9990-4e1b-8a1c-6f3bd2a1e0ee"}
SOURCE_TAGS = {"artist": "AC/DC", "title": "Back in Black", "album": "Back in Black",
               "albumartist": "AC/DC & Friends", "genre": "Hard Rock", "date": "1980",
               "tracknumber": "6/10", "discnumber": "1/1", "composer": "Angus Young", **MBID}


def _tagged_input(path, fmt):
    """A source file as a downloader leaves it: rich tags (and lyrics, not to be copied)."""
    make_audio(path, 3.0)
    media = MutagenFile(path, easy=True)
    if media.tags is None:
        media.add_tags()
    audio.read_tags(path)  # registers the extra EasyMP4 keys (composer, release group)
    for key, value in SOURCE_TAGS.items():
        media.tags[key] = [value]
    media.save()
    raw = MutagenFile(path)
    if fmt == "m4a":
        raw.tags["\xa9lyr"] = ["secret lyrics"]
    elif fmt == "mp3":
        from mutagen.id3 import USLT
        raw.tags.add(USLT(encoding=3, lang="eng", desc="", text="secret lyrics"))
    else:
        raw["LYRICS"] = "secret lyrics"
    raw.save()
    return path


def _replaygain(path, fmt):
    """(gain dB, peak) as a player reads them from the file."""
    raw = MutagenFile(path)
    if fmt == "m4a":
        gain = bytes(raw.tags["----:com.apple.iTunes:replaygain_track_gain"][0]).decode()
        peak = bytes(raw.tags["----:com.apple.iTunes:replaygain_track_peak"][0]).decode()
    elif fmt == "mp3":
        gain = raw.tags["TXXX:REPLAYGAIN_TRACK_GAIN"].text[0]
        peak = raw.tags["TXXX:REPLAYGAIN_TRACK_PEAK"].text[0]
    else:
        gain, peak = raw["REPLAYGAIN_TRACK_GAIN"][0], raw["REPLAYGAIN_TRACK_PEAK"][0]
    assert re.fullmatch(r"[+-]\d+\.\d\d dB", gain), gain
    return float(gain.split()[0]), float(peak)


@pytest.mark.parametrize("fmt", ["m4a", "mp3", "flac"])
def test_every_version_is_tagged_for_media_libraries(imaker_env, tmp_path, monkeypatch, fmt):
    monkeypatch.setenv("OUTPUT_AUDIO_FORMAT", fmt)
    monkeypatch.setenv("GENERATE_DRUMS_ONLY_VARIANT", "true")
    settings = load_settings()
    src = _tagged_input(tmp_path / f"in.{fmt}", fmt)
    write_bundle(settings.paths.queue_other, "tagged", src, title="Back in Black", source_type="local")
    result, settings = _materialize("tagged")
    assert result.success
    out = settings.paths.outputs_dir / "tagged"
    manifest = json.loads((out / "manifest.json").read_text())
    arts = {a["variant"]: a for a in manifest["artifacts"]}
    assert sorted(arts) == ["drums_only", "instrumental", "no_drums"]
    titles = {}
    stems, meta = load_stems(Library.from_settings(settings), "tagged")
    for name, art in arts.items():
        path = out / art["path"]
        easy = MutagenFile(path, easy=True)
        titles[name] = easy["title"][0]
        assert easy["artist"] == ["AC/DC"] and easy["album"] == ["YTDL"]
        assert easy["albumartist"] == ["AC/DC & Friends"]
        for key in ("genre", "date", "tracknumber", "discnumber", *MBID):
            assert easy[key] == [SOURCE_TAGS[key]], key
        raw = MutagenFile(path)
        composer = {"m4a": lambda: raw.tags["\xa9wrt"], "mp3": lambda: raw.tags["TCOM"].text,
                    "flac": lambda: raw["COMPOSER"]}[fmt]()
        assert list(composer) == ["Angus Young"]
        assert "secret lyrics" not in repr(raw.tags)  # lyrics are not copied
        # ReplayGain 2.0: -18 LUFS minus the file's own EBU R128 loudness
        gain, peak = _replaygain(path, fmt)
        assert abs(gain - (-18.0 - art["loudness_lufs"])) <= 0.1
        assert gain == art["replaygain_track_gain_db"] and peak == art["replaygain_track_peak"]
        # ReplayGain describes the PCM sent to the encoder (measured while encoding, never
        # by a decode of the file: issue 22): mixed again here from the stored stems and
        # measured independently by ffmpeg
        pcm = tmp_path / f"pcm_{fmt}_{name}.flac"
        remixed = mix(stems, VARIANTS[name])[0]
        audio.encode(remixed, meta["sample_rate"], pcm, "flac")
        measured = oracles.loudness(pcm)
        assert abs(gain - (-18.0 - measured["integrated_lufs"])) <= 0.1
        # the peak tag is that PCM's sample peak (ReplayGain 2.0 allows it; no true peak)
        assert abs(peak - float(np.max(np.abs(remixed)))) <= 1e-5
        # and the published file is that PCM: identical in FLAC; through a lossy codec this
        # 3 s test signal 50 dB below full scale, with 20 LU of loudness range, moves its
        # gated loudness by up to about 1 LU (music at usual levels: far less than 0.1)
        published = oracles.loudness(path)
        assert abs(published["integrated_lufs"] - measured["integrated_lufs"]) <= \
            (0.1 if fmt == "flac" else 1.5)
    assert titles == {"instrumental": "Back in Black (Instrumental)",
                      "no_drums": "Back in Black (Instrumental, no drums)",
                      "drums_only": "Back in Black (Drums only)"}
    assert titles == {n: VARIANTS[n].tagged_title("Back in Black") for n in titles}
    # the file names keep the plan's contract
    assert sorted(a["path"] for a in arts.values()) == sorted(
        f"files/audio/AC_DC - Back in Black{VARIANTS[n].suffix}.{fmt}" for n in arts)

    # the input peak and the ReplayGain values in the manifest, the catalog and the UI
    peak = manifest["provenance"]["source"]["input_peak_dbfs"]
    assert isinstance(peak, float) and -20 < peak < 0
    row = build_catalog(settings.paths.outputs_dir, settings.paths.stems_dir).iloc[0]
    assert row["input_peak_dbfs"] == peak
    assert row["replaygain_db"] == ",".join(
        f"{n}={arts[n]['replaygain_track_gain_db']:+.2f}" for n in ("instrumental", "no_drums",
                                                                    "drums_only"))
    mats = {m.asset_key.path[-1]: m for m in result.asset_materializations_for_node("variants")}
    shown = mats["variants"].metadata["per_variant"].value
    assert shown["no_drums"]["replaygain_track_gain_db"] == arts["no_drums"][
        "replaygain_track_gain_db"]


def test_a_silent_source_fails_before_separation(imaker_env, tmp_path):
    settings = load_settings()
    quiet = tmp_path / "quiet.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:sample_rate=44100:duration=3", "-af", "volume=-75dB",
                    str(quiet)], check=True)
    write_bundle(settings.paths.queue_other, "quiet", quiet)
    result, settings = _materialize("quiet")
    assert not result.success
    error = json.loads((settings.paths.archive_dir / "failed" / "job_quiet" / "error.json").read_text())
    assert error["stage"] == "source_audio"
    assert error["error"].startswith("the source is silent: audio.m4a has an RMS level of -")
    assert not (settings.paths.stems_dir / "quiet").exists()  # the model never ran


def _limited(max_bytes):
    """A process whose files cannot grow past ``max_bytes`` (as on a full disk: writes fail
    with EFBIG instead of ENOSPC); SIGXFSZ ignored, as the ffmpeg children inherit."""
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return setup


def test_write_errors_name_the_file(imaker_env, source_m4a):
    settings = load_settings()
    write_bundle(settings.paths.queue_other, "full", source_m4a)
    result, settings = _materialize("full", selection=[source_audio, stems])
    assert result.success
    stems_dir = settings.paths.stems_dir / "full"
    code = f"""
import sys
from imaker.pipeline import Library, describe_error, make_variants
from imaker.settings import Output, load_settings
from imaker.stemstore import RawStemWriter
import numpy as np
s = load_settings()
lib = Library.from_settings(s)
try:
    make_variants(Output(), lib, "full")
except Exception as exc:
    print("variants:", describe_error(exc))
writer = RawStemWriter({str(stems_dir / "retry")!r}, ["drums", "bass"])
try:
    writer(0, np.ones((2, 2, 100_000), dtype=np.float32) * 0.1)
except Exception as exc:
    print("stems:", describe_error(exc))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=_limited(20_000), timeout=300)
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    out_file = settings.paths.outputs_dir / "full" / "files" / "audio" / "AC_DC - Test Song.m4a"
    assert "variants" in lines, proc.stdout + proc.stderr
    assert f"cannot encode {out_file.parent}" in lines["variants"]
    assert "killed by SIGXFSZ" in lines["variants"]  # past the file size limit
    assert lines["stems"] == f"OSError: File too large: {stems_dir / 'retry' / '.drums.f32.part'}"
    assert not [p for p in (settings.paths.outputs_dir / "full").rglob("*") if p.is_file()]


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB tmpfs: writes past it fail with ENOSPC (needs root, as in CI)."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_the_encode_naming_the_file(full_disk):
    """ffmpeg exits 0 when the trailer meets a full disk: the error it printed fails the file
    anyway, and nothing is published under the final name."""
    import numpy as np

    wav = (0.3 * np.random.default_rng(0).standard_normal((2, 44100 * 10))).astype(np.float32)
    dest = full_disk / "music" / "AC_DC - Song.m4a"
    with pytest.raises(audio.AudioError) as err:
        audio.encode(wav, 44100, dest, "m4a")
    assert str(err.value).startswith(f"cannot encode {dest}: ")
    assert "No space left on device" in str(err.value)
    assert list(dest.parent.iterdir()) == []
