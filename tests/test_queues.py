import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from conftest import write_bundle
from imaker.queues import ClaimLost, Owner, QueueStore


@pytest.fixture
def store(tmp_path):
    s = QueueStore({"youtube_audio": tmp_path / "q" / "ya", "youtube_video": tmp_path / "q" / "yv",
                    "other": tmp_path / "q" / "other"},
                   tmp_path / "working", tmp_path / "archive", max_attempts=2)
    s.ensure_dirs()
    return s


def test_scan_sees_only_ready_bundles(store, source_m4a):
    q = store.queues["youtube_audio"]
    write_bundle(q, "ready1", source_m4a)
    (q / "job_partial.tmp").mkdir()                  # retriever still writing
    (q / ".job_hidden").mkdir()                      # hidden
    (q / "job_file").write_text("not a folder")      # a file
    (q / "notes").mkdir()                            # not a bundle name
    (q / "job_bad,id").mkdir()                       # invalid id: can never be a partition
    os.symlink(q / "ready1", q / "job_linked")       # symlinked bundle folder
    ready, invalid = store.scan()
    assert [j.job_id for j in ready] == ["ready1"]
    assert sorted(e.path.name for e in invalid) == ["job_bad,id", "job_linked"]


def test_fifo_order_across_queues(store, source_m4a):
    write_bundle(store.queues["other"], "first", source_m4a)
    write_bundle(store.queues["youtube_audio"], "second", source_m4a)
    assert [j.job_id for j in store.discover()] == ["first", "second"]


def test_reject_moves_invalid_folder_to_failed_with_reason(store):
    (store.queues["other"] / "job_bad,id").mkdir()
    _, invalid = store.scan()
    dest = store.reject(invalid[0])
    assert not (store.queues["other"] / "job_bad,id").exists()
    error = json.loads((dest / "error.json").read_text())
    assert error["stage"] == "queue" and "not job_<id>" in error["error"]


def test_claim_then_archive_done_and_failed(store, source_m4a):
    write_bundle(store.queues["other"], "a", source_m4a)
    write_bundle(store.queues["other"], "b", source_m4a)
    a, b = store.discover()
    store.claim(a, Owner.current("run-a"))
    store.claim(b, Owner.current("run-b"))
    assert store.read_claim("a").run_id == "run-a"
    assert store.archive_done("a") == store.done_dir / "job_a"
    failed = store.fail("b", "stems", "boom")
    assert (failed / "audio.m4a").is_file()
    error = json.loads((failed / "error.json").read_text())
    assert error == {"job_id": "b", "stage": "stems", "error": "boom", "at": error["at"]}
    assert list(store.working_dir.iterdir()) == []


def _race(args):
    queue, working, archive, n = args
    from pathlib import Path

    s = QueueStore({"other": Path(queue)}, Path(working), Path(archive))
    won = 0
    for i in range(n):
        jobs = [j for j in s.discover() if j.job_id == f"r{i}"]
        if not jobs:
            continue
        try:
            s.claim(jobs[0], Owner.current(f"pid{os.getpid()}"))
            won += 1
        except ClaimLost:
            pass
    return won


def test_two_concurrent_claimers_exactly_one_wins(store, source_m4a):
    n = 40
    for i in range(n):
        write_bundle(store.queues["other"], f"r{i}", source_m4a)
    args = (str(store.queues["other"]), str(store.working_dir), str(store.archive_dir), n)
    with mp.get_context("spawn").Pool(2) as pool:
        wins = pool.map(_race, [args, args])
    assert sum(wins) == n                       # every job claimed exactly once
    assert len(list(store.working_dir.iterdir())) == n
    assert store.discover() == []


def test_claim_does_not_replace_an_existing_working_folder(store, source_m4a):
    write_bundle(store.queues["other"], "dup", source_m4a)
    (store.working_dir / "job_dup").mkdir()  # an empty dir would be silently replaced by rename()
    with pytest.raises(ClaimLost):
        store.claim(store.discover()[0], Owner.current("r"))
    assert (store.queues["other"] / "job_dup" / "job.json").is_file()


def test_dead_claim_is_requeued_then_failed_after_max_attempts(store, source_m4a):
    write_bundle(store.queues["youtube_audio"], "dies", source_m4a)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_owner = Owner(run_id=None, pid=dead.pid, host=Owner.current().host)
    first_key = store.run_key(store.discover()[0])

    store.claim(store.discover()[0], dead_owner)
    # a live claim is left alone
    assert store.recover_stale(is_alive=lambda c: True) == []
    assert store.recover_stale(is_alive=lambda c: False) == [("dies", "requeued")]
    job = store.discover()[0]
    assert job.queue == "youtube_audio"
    assert store.run_key(job) != first_key   # a new run is requested for the retry

    store.claim(job, dead_owner)
    assert store.recover_stale(is_alive=lambda c: False) == [("dies", "failed")]
    error = json.loads((store.failed_dir / "job_dies" / "error.json").read_text())
    assert error["stage"] == "recovery" and "died 2 time(s)" in error["error"]


def test_default_liveness_uses_the_claiming_process(store, source_m4a):
    write_bundle(store.queues["other"], "p", source_m4a)
    store.claim(store.discover()[0], Owner.current("alive"))
    assert store.recover_stale() == []  # this very process holds it


def test_resubmitting_an_archived_job_gets_a_new_run_key(store, source_m4a):
    write_bundle(store.queues["other"], "again", source_m4a)
    job = store.discover()[0]
    assert store.run_key(job) == "again"
    store.claim(job, Owner.current("r1"))
    store.archive_done("again")
    write_bundle(store.queues["other"], "again", source_m4a)
    job2 = store.discover()[0]
    assert store.run_key(job2) == "again:1"
    store.claim(job2, Owner.current("r2"))
    store.archive_done("again")  # the older archived copy is kept under a dated name
    names = sorted(p.name for p in store.done_dir.iterdir())
    assert names[0] == "job_again" and names[1].startswith("job_again@") and len(names) == 2
