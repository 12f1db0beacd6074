import json
import multiprocessing as mp
import os

import pytest

from conftest import write_bundle
from imaker.queues import CLAIM_DIR, CLAIM_FILE, ClaimLost, JobNotFound, QueueStore


@pytest.fixture
def store(tmp_path):
    s = QueueStore({"youtube_audio": tmp_path / "q" / "ya", "youtube_video": tmp_path / "q" / "yv",
                    "other": tmp_path / "q" / "other"},
                   tmp_path / "working", tmp_path / "archive")
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
    ca = store.claim(a, by="test")
    cb = store.claim(b, by="test")
    assert store.read_claim("a") == ca and ca.drop_id != cb.drop_id and ca.queue == "other"
    # only the drop that holds the claim archives it
    assert store.archive_done("a", "someone-else") is None
    assert store.archive_done("a", ca.drop_id) == store.done_dir / "job_a"
    assert store.settled("a", ca.drop_id) == ("done", store.done_dir / "job_a")
    assert store.fail("b", "someone-else", "stems", "boom") is None
    failed = store.fail("b", cb.drop_id, "stems", "boom")
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
            s.claim(jobs[0], by=f"pid{os.getpid()}")
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
        store.claim(store.discover()[0], by="test")
    assert (store.queues["other"] / "job_dup" / "job.json").is_file()


def test_a_claim_record_is_written_once_and_a_lost_record_is_recreated(store, source_m4a):
    write_bundle(store.queues["other"], "rec", source_m4a)
    claim = store.claim(store.discover()[0], by="first")
    folder = store.working_dir / "job_rec"
    # a second writer (a reconciler racing the claimer) cannot replace the record
    again = store._record_claim(folder, claim.__class__("rec", "other", "other-drop", "t", "x"))
    assert again == claim
    # a claimer that died between the rename and the record: after the grace period the
    # folder gets a record (a new drop), so a run is requested for it
    (folder / CLAIM_DIR / CLAIM_FILE).unlink()
    assert store.claims(grace_s=3600) == []
    [fresh] = store.claims(grace_s=0)
    assert fresh.job_id == "rec" and fresh.drop_id != claim.drop_id


def test_failed_job_is_requeued_with_its_error_kept_as_history(store, source_m4a):
    write_bundle(store.queues["youtube_audio"], "retry1", source_m4a)
    claim = store.claim(store.discover()[0], by="test")
    store.fail("retry1", claim.drop_id, "stems", "boom")
    dest = store.requeue_failed("retry1")
    assert dest == store.queues["youtube_audio"] / "job_retry1"
    [old] = (dest / CLAIM_DIR / "history").iterdir()
    assert json.loads(old.read_text())["error"] == "boom"
    assert not (dest / "error.json").exists() and store.read_claim("retry1", dest) is None
    second = store.claim(store.discover()[0], by="test")
    assert second.drop_id != claim.drop_id
    with pytest.raises(JobNotFound):
        store.requeue_failed("retry1")


def test_resubmitting_an_archived_job_is_a_new_drop_and_keeps_the_old_archive(store, source_m4a):
    write_bundle(store.queues["other"], "again", source_m4a)
    first = store.claim(store.discover()[0], by="test")
    store.archive_done("again", first.drop_id)
    write_bundle(store.queues["other"], "again", source_m4a)
    second = store.claim(store.discover()[0], by="test")
    assert second.drop_id != first.drop_id
    store.archive_done("again", second.drop_id)  # the older archived copy keeps a dated name
    names = sorted(p.name for p in store.done_dir.iterdir())
    assert names[0] == "job_again" and names[1].startswith("job_again@") and len(names) == 2
    assert store.settled("again", second.drop_id)[0] == "done"


def test_a_failed_drop_processed_after_all_moves_to_done(store, source_m4a):
    """A failed run re-executed from the UI: a new failure rewrites error.json in place, a
    success moves the bundle to done/ with the old reasons kept as history."""
    write_bundle(store.queues["other"], "redo", source_m4a)
    claim = store.claim(store.discover()[0], by="test")
    store.fail("redo", claim.drop_id, "stems", "first")
    store.fail("redo", claim.drop_id, "variants", "second")
    error = json.loads((store.failed_dir / "job_redo" / "error.json").read_text())
    assert error["stage"] == "variants" and error["error"] == "second"
    assert store.archive_done("redo", "another-drop") is None
    assert store.archive_done("redo", claim.drop_id) == store.done_dir / "job_redo"
    assert not (store.failed_dir / "job_redo").exists()
    [old] = (store.done_dir / "job_redo" / CLAIM_DIR / "history").iterdir()
    assert json.loads(old.read_text())["error"] == "second"
    assert store.settled("redo", claim.drop_id)[0] == "done"
