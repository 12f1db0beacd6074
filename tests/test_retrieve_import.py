"""`imaker import`: a small tagged tree (mp3/ID3, m4a/MP4 with embedded cover, flac) and
untagged files named Artist/Album/Title.ext become bundles in QUEUE_OTHER."""

from __future__ import annotations

import json
import shutil

from mutagen.flac import FLAC
from mutagen.id3 import ID3, TALB, TIT2, TPE1
from mutagen.mp4 import MP4, MP4Cover

from conftest import make_audio, make_cover
from imaker.bundle import JobBundle
from imaker.retrievers.cli import main as cli_main
from imaker.settings import load_settings
from test_retrieve_support import bundles, retr_env  # noqa: F401


def _tree(root, tmp_path):
    cover = make_cover(tmp_path / "c.jpg")
    mp3 = make_audio(root / "x" / "a.mp3", 1.5)
    tags = ID3()
    tags.add(TPE1(encoding=3, text=["Tagged Artist"]))
    tags.add(TIT2(encoding=3, text=["Tagged Title"]))
    tags.add(TALB(encoding=3, text=["Tagged Album"]))
    tags.save(mp3)
    m4a = make_audio(root / "y" / "b.m4a", 1.5)
    mp4 = MP4(m4a)
    if mp4.tags is None:
        mp4.add_tags()
    mp4.tags.update({"\xa9ART": ["M4A Artist"], "\xa9nam": ["M4A Song"],
                     "covr": [MP4Cover(cover.read_bytes(), imageformat=MP4Cover.FORMAT_JPEG)]})
    mp4.save()
    flac = make_audio(root / "z" / "c.flac", 1.5)
    f = FLAC(flac)
    f["ARTIST"], f["TITLE"], f["ALBUM"] = "Flac Artist", "Flac Song", "Flac Album"
    f.save()
    plain = make_audio(root / "AC_DC" / "Back in Black" / "01 - Hells Bells.mp3", 1.5)
    shutil.copy(cover, plain.parent / "Cover.JPG")
    (root / "notes.txt").write_text("not audio")
    (root / "y" / "broken.mp3").write_bytes(b"\0" * 2048)
    (root / ".hidden").mkdir()
    make_audio(root / ".hidden" / "skip.mp3", 1.0)
    return root


def _by_title(queue):
    out = {}
    for name in bundles(queue):
        b = JobBundle.load(queue / name)
        out[b.title] = b
    return out


def test_import_tagged_tree(retr_env, tmp_path, capsys):
    root = _tree(tmp_path / "music", tmp_path)
    assert cli_main(["import", str(root)]) == 1  # broken.mp3 is rejected, the rest queued
    out = capsys.readouterr().out
    assert out.count(": queued local_") == 4 and "broken.mp3: rejected" in out, out
    s = load_settings()
    got = _by_title(s.paths.queue_other)
    assert set(got) == {"Tagged Title", "M4A Song", "Flac Song", "Hells Bells"}
    assert (got["Tagged Title"].artist, got["Tagged Title"].album) == ("Tagged Artist", "Tagged Album")
    # no album tag, and y/b.m4a is no Artist/Album/Title path: no album
    assert (got["M4A Song"].artist, got["M4A Song"].album) == ("M4A Artist", None)
    assert got["M4A Song"].cover == "cover.jpg"  # embedded cover extracted
    assert got["Flac Song"].album == "Flac Album" and got["Flac Song"].audio == "audio.flac"
    plain = got["Hells Bells"]
    assert (plain.artist, plain.album) == ("AC_DC", "Back in Black")  # from the path
    assert plain.cover == "cover.jpg" and plain.source_type == "local"
    assert all(b.job_id.startswith("local_") for b in got.values())
    data = json.loads((plain.root / "job.json").read_text())
    assert data["local"]["from_path"]["title"] == "Hells Bells"
    assert (root / "x" / "a.mp3").is_file()  # copied, not moved

    # the same files again: duplicates, nothing new
    assert cli_main(["import", str(root / "x"), str(root / "z" / "c.flac")]) == 0
    assert capsys.readouterr().out.count("duplicate") == 2
    assert len(bundles(s.paths.queue_other)) == 4


def test_import_single_file_uses_its_folders_and_move(retr_env, tmp_path, capsys):
    src = make_audio(tmp_path / "incoming" / "Some Band" / "Some Album" / "Song Name.m4a", 1.5)
    other = make_audio(tmp_path / "incoming" / "Artist X - Title Y.m4a", 1.5, freq=300)
    assert cli_main(["import", "--move", str(src), str(other)]) == 0
    s = load_settings()
    got = _by_title(s.paths.queue_other)
    assert (got["Song Name"].artist, got["Song Name"].album) == ("Some Band", "Some Album")
    assert got["Title Y"].artist == "Artist X"
    assert not src.exists() and not other.exists()  # --move: the drop-folder behaviour
