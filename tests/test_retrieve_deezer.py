"""Deezer: the deemix track record -> job.json mapping (no network here), and clear
errors when deemix or DEEZER_ARL is missing."""

from __future__ import annotations

import importlib.util

import pytest

from imaker.bundle import JobBundle
from imaker.retrievers.cli import run_retriever
from imaker.retrievers.deezer import INSTALL_HINT, deezer_job
from imaker.retrievers.media import FileTags
from imaker.settings import load_settings
from test_retrieve_support import retr_env  # noqa: F401


def test_mapping_prefers_file_tags_and_validates(tmp_path, source_m4a):
    api = {"id": 3135556, "title": "Harder, Better, Faster, Stronger", "isrc": "GBDUW0000059",
           "duration": 224, "link": "https://www.deezer.com/track/3135556",
           "artist": {"id": 27, "name": "Daft Punk"},
           "album": {"id": 302127, "title": "Discovery"}}
    job = deezer_job(api, FileTags(album="Discovery (Remastered)"), audio_name="audio.m4a",
                     cover_name="cover.jpg")
    assert job["job_id"] == "dz_3135556" and job["source_type"] == "deezer"
    assert (job["artist"], job["title"], job["album"]) == \
        ("Daft Punk", "Harder, Better, Faster, Stronger", "Discovery (Remastered)")
    assert job["deezer"] == {"track_id": "3135556", "isrc": "GBDUW0000059",
                             "duration_online_s": 224, "album_id": "302127"}
    assert job["source_url"] == "https://www.deezer.com/track/3135556"
    # deemix's own per-file record (artist as a plain string) works too
    rec = deezer_job({"id": "42", "title": "T", "artist": "A"})
    assert (rec["job_id"], rec["artist"], rec["album"]) == ("dz_42", "A", None)
    # and the result is a valid bundle
    folder = tmp_path / "job_dz_3135556"
    folder.mkdir()
    (folder / "audio.m4a").write_bytes(source_m4a.read_bytes())
    (folder / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    import json
    (folder / "job.json").write_text(json.dumps(job))
    assert JobBundle.load(folder).artist == "Daft Punk"
    with pytest.raises(Exception, match="no id"):
        deezer_job({"id": 0, "title": "x"})


def test_missing_deemix_or_arl_is_reported_per_url(retr_env):
    out = run_retriever("deezer", ["https://www.deezer.com/track/1"], load_settings())
    assert [o.status for o in out] == ["failed"]
    if importlib.util.find_spec("deemix") is None:
        assert out[0].message == INSTALL_HINT
    else:
        assert "DEEZER_ARL" in out[0].message
