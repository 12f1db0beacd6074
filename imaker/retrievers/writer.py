"""The one bundle writer every retriever goes through, and the index of seen sources.

``BundleWriter.write`` makes a bundle appear all at once::

    queue/.imaker-retrievers.lock    flock held while one bundle is written into this queue
    queue/job_<id>.tmp/              files + job.json written, fsynced, validated here
    queue/job_<id>/                  ... then renamed in one step (never replacing anything)

The processor ignores ``*.tmp`` folders and hidden entries, so it never sees a partial
bundle. The seen index (sqlite, ``$IMAKER_DATA/retrievers/seen.sqlite``) maps a *source
key* (``youtube:<video id>#audio``, ``deezer:<track id>``, ``local:sha256:<hash>``) to the job
it became; a key already there is a duplicate unless the write is forced.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

from ..bundle import BUNDLE_PREFIX, JOB_ID_RE, BundleError, JobBundle
from ..fsutil import fsync_dir, rename_noreplace
from ..queues import utcnow

LOCK_NAME = ".imaker-retrievers.lock"


class BundleWriteError(RuntimeError):
    pass


class DuplicateJob(BundleWriteError):
    """The source was queued before (or a bundle with this job id is waiting)."""


class SeenIndex:
    """Source key -> the job it was queued as. Safe for several processes (sqlite)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS seen (source_key TEXT PRIMARY KEY, "
                       "job_id TEXT NOT NULL, queue TEXT NOT NULL, at TEXT NOT NULL, "
                       "info TEXT)")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def get(self, source_key: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT job_id, queue, at, info FROM seen WHERE source_key = ?",
                             (source_key,)).fetchone()
        if row is None:
            return None
        return {"source_key": source_key, "job_id": row[0], "queue": row[1], "at": row[2],
                "info": json.loads(row[3]) if row[3] else None}

    def record(self, source_key: str, job_id: str, queue: str, info: dict | None = None) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?, ?)",
                       (source_key, job_id, queue, utcnow(), json.dumps(info) if info else None))

    def forget(self, source_key: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM seen WHERE source_key = ?", (source_key,)).rowcount > 0

    def all(self) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT source_key FROM seen ORDER BY at").fetchall()
        return [self.get(r[0]) for r in rows]


@contextmanager
def queue_lock(queue_dir: Path) -> Iterator[None]:
    """Exclusive lock on one queue for the time one bundle is written into it."""
    queue_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(queue_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_tree(root: Path) -> None:
    for folder, dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


_FIRST = ("schema_version", "job_id", "source_type", "title", "artist", "album", "audio",
          "video", "cover", "variants")


def _ordered(job: Mapping[str, Any]) -> dict[str, Any]:
    """job.json with the contract's fields first (easier to read), the rest after."""
    out = {k: job[k] for k in _FIRST if k in job}
    out.update((k, v) for k, v in job.items() if k not in out)
    return out


class BundleWriter:
    def __init__(self, index: SeenIndex | None = None):
        self.index = index

    def write(self, queue_dir: Path, job: Mapping[str, Any], files: Mapping[str, Path], *,
              source_key: str | None = None, force: bool = False,
              move: bool | Collection[str] = False) -> Path:
        """Write ``job`` (the job.json dict) and ``files`` (bundle-relative name -> source
        file, copied; moved when ``move`` is True or names it) as ``queue_dir/job_<id>/``. Returns the bundle folder.

        Raises DuplicateJob when ``source_key`` is in the index (unless ``force``) or a
        bundle with this id is already waiting in the queue, BundleError when the result
        would not be a valid bundle. Nothing is left behind on failure."""
        queue_dir = Path(queue_dir)
        job = _ordered(job)
        moved = set(files) if move is True else set(move or ())
        job_id = job.get("job_id")
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise BundleError(f"job id {job_id!r} does not match {JOB_ID_RE.pattern}")
        if source_key is not None:
            block = dict(job.get("retriever") or {})
            block.setdefault("source_key", source_key)
            block.setdefault("retrieved_at", utcnow())
            job["retriever"] = block
        final = queue_dir / f"{BUNDLE_PREFIX}{job_id}"
        tmp = queue_dir / f"{BUNDLE_PREFIX}{job_id}.tmp"
        with queue_lock(queue_dir):
            if source_key is not None and self.index is not None and not force:
                seen = self.index.get(source_key)
                if seen is not None:
                    raise DuplicateJob(f"{source_key} was queued as {seen['job_id']} in "
                                       f"{seen['queue']} at {seen['at']} (force to queue it again)")
            if final.exists() or final.is_symlink():
                raise DuplicateJob(f"{final} is already waiting in the queue")
            if tmp.exists() or tmp.is_symlink():
                # every writer holds the queue lock while its .tmp exists: this one is the
                # leftover of a writer that crashed
                shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
            tmp.mkdir()
            try:
                for rel, src in files.items():
                    dest = tmp / rel
                    if not dest.resolve().is_relative_to(tmp.resolve()):
                        raise BundleError(f"bundle file name {rel!r} leaves the bundle")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    if rel in moved:
                        shutil.move(str(src), dest)
                    else:
                        shutil.copyfile(src, dest)
                (tmp / "job.json").write_text(json.dumps(job, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
                JobBundle.load(tmp)  # exactly what the processor will check
                _fsync_tree(tmp)
                rename_noreplace(tmp, final)
            except FileExistsError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise DuplicateJob(f"{final} is already waiting in the queue") from None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(queue_dir)
            if source_key is not None and self.index is not None:
                self.index.record(source_key, job_id, queue_dir.name,
                                  {"path": str(final), "title": job.get("title"),
                                   "artist": job.get("artist")})
        return final


__all__ = ["BundleWriter", "BundleWriteError", "DuplicateJob", "SeenIndex", "queue_lock"]
