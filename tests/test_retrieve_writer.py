"""The shared bundle writer, the seen index and the entry-point registry."""

from __future__ import annotations

import json
import shutil
import sys
import threading

import pytest

from imaker.bundle import BundleError, JobBundle
from imaker.retrievers import BundleWriter, DuplicateJob, SeenIndex, make_job_id, registry
from imaker.retrievers.base import RetrieveContext, Retriever
from imaker.retrievers.cli import main as cli_main
from imaker.settings import load_settings


def _job(job_id, **extra):
    return {"schema_version": 1, "job_id": job_id, "source_type": "test", "title": "T",
            "artist": "A", "audio": "audio.m4a", **extra}


def test_write_validates_renames_and_records(tmp_path, source_m4a):
    index = SeenIndex(tmp_path / "seen.sqlite")
    queue = tmp_path / "q"
    path = BundleWriter(index).write(queue, _job("abc_1"), {"audio.m4a": source_m4a},
                                     source_key="test:1")
    assert path == queue / "job_abc_1" and JobBundle.load(path).job_id == "abc_1"
    assert source_m4a.is_file()  # copied, not moved
    data = json.loads((path / "job.json").read_text())
    assert list(data)[:3] == ["schema_version", "job_id", "source_type"]
    assert data["retriever"]["source_key"] == "test:1"
    assert index.get("test:1")["job_id"] == "abc_1"
    with pytest.raises(DuplicateJob, match="test:1 was queued as abc_1"):
        BundleWriter(index).write(queue, _job("abc_2"), {"audio.m4a": source_m4a},
                                  source_key="test:1")
    # forced: the index is bypassed (a new id, so no clash with the waiting bundle)
    BundleWriter(index).write(queue, _job("abc_2"), {"audio.m4a": source_m4a},
                              source_key="test:1", force=True)
    assert sorted(p.name for p in queue.iterdir() if not p.name.startswith(".")) == \
        ["job_abc_1", "job_abc_2"]


def test_invalid_bundle_leaves_nothing(tmp_path, source_m4a):
    queue = tmp_path / "q"
    writer = BundleWriter(SeenIndex(tmp_path / "seen.sqlite"))
    with pytest.raises(BundleError, match="does not exist"):
        writer.write(queue, _job("x1", cover="cover.jpg"), {"audio.m4a": source_m4a},
                     source_key="k")
    with pytest.raises(BundleError):
        writer.write(queue, _job("bad id!"), {"audio.m4a": source_m4a})
    with pytest.raises(BundleError, match="leaves the bundle"):
        writer.write(queue, _job("x2"), {"../evil.m4a": source_m4a, "audio.m4a": source_m4a})
    assert [p.name for p in queue.iterdir() if not p.name.startswith(".")] == []
    assert writer.index.get("k") is None


def test_leftover_tmp_of_a_crashed_writer_is_replaced(tmp_path, source_m4a):
    queue = tmp_path / "q"
    (queue / "job_z.tmp").mkdir(parents=True)
    (queue / "job_z.tmp" / "junk").write_text("half")
    path = BundleWriter().write(queue, _job("z"), {"audio.m4a": source_m4a})
    assert not (path / "junk").exists() and not (queue / "job_z.tmp").exists()


def test_concurrent_reader_never_sees_a_partial_bundle(tmp_path, source_m4a):
    big = tmp_path / "big.m4a"
    with open(big, "wb") as fh:  # a large file makes the write window wide
        fh.write(source_m4a.read_bytes())
        fh.write(b"\0" * (8 << 20))
    queue = tmp_path / "q"
    queue.mkdir()
    stop = threading.Event()
    seen, problems = set(), []

    def reader():
        while True:
            # one whole scan begun after the writer finished, so the last bundle is seen
            # even when `stop` is set while a scan is under way
            last = stop.is_set()
            for entry in queue.iterdir():
                if entry.name.startswith("job_") and not entry.name.endswith(".tmp") \
                        and entry.name not in seen:
                    try:
                        b = JobBundle.load(entry)
                        if b.media_path("audio").stat().st_size != big.stat().st_size:
                            problems.append(f"{entry.name}: short audio")
                    except Exception as exc:  # noqa: BLE001
                        problems.append(f"{entry.name}: {exc}")
                    seen.add(entry.name)
            if last:
                break

    t = threading.Thread(target=reader)
    t.start()
    writer = BundleWriter()
    for i in range(6):
        writer.write(queue, _job(f"c{i}"), {"audio.m4a": big})
    stop.set()
    t.join()
    assert problems == []
    assert seen == {f"job_c{i}" for i in range(6)}


def test_job_ids():
    assert make_job_id("yt", "dQw4w9WgXcQ") == "yt_dQw4w9WgXcQ"
    assert make_job_id("local", "AC/DC - Back in Black", "abc") == "local_AC_DC_-_Back_in_Black_abc"
    assert len(make_job_id("x", "y" * 500)) <= 128


class _EchoRetriever(Retriever):
    name = "echo"
    description = "test plugin: queues a copy of a local file"
    source_type = "echo"

    def retrieve_one(self, target):
        yield self.write(queue="other", job=_job(make_job_id("echo", target.rsplit("/", 1)[-1]),
                                                 source_type="echo"),
                         files={"audio.m4a": target}, source_key=f"echo:{target}",
                         target=target, move=False)


def test_entry_point_plugin_is_listed_and_runs(imaker_env, tmp_path, monkeypatch, capsys,
                                               source_m4a):
    # a real installed distribution's metadata: <dist>.dist-info/entry_points.txt on sys.path
    site = tmp_path / "site"
    dist = site / "imaker_echo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: imaker-echo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[imaker.retrievers]\necho = test_retrieve_writer:_EchoRetriever\n"
        "broken = no_such_module:Nope\nyoutube = test_retrieve_writer:_EchoRetriever\n")
    monkeypatch.syspath_prepend(str(site))
    infos = registry.available()
    assert infos["echo"].origin == "imaker-echo 1.0"
    assert infos["youtube"].origin == "built-in"  # a plugin cannot take a built-in name
    rows = {name: desc for name, _, desc in registry.describe_all()}
    assert rows["echo"].startswith("test plugin") and rows["broken"].startswith("unavailable")

    assert cli_main(["retrieve", "--list"]) == 0
    assert "echo" in capsys.readouterr().out
    src = tmp_path / "song.m4a"
    shutil.copy(source_m4a, src)
    assert cli_main(["retrieve", "echo", str(src)]) == 0
    out = capsys.readouterr().out
    assert "queued echo_song.m4a" in out
    s = load_settings()
    assert JobBundle.load(s.paths.queue_other / "job_echo_song.m4a").source_type == "echo"
    assert cli_main(["retrieve", "echo", str(src)]) == 0  # duplicate: fine, exit 0
    assert "duplicate" in capsys.readouterr().out
    assert cli_main(["retrieve", "broken", "x"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    ctx = RetrieveContext(s)
    assert ctx.writer.index.get(f"echo:{src}")["job_id"] == "echo_song.m4a"
    assert sys.modules.get("no_such_module") is None
