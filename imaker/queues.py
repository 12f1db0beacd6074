"""Queue store: discover, claim, archive and recover job bundles (no Dagster).

Layout (every folder configurable, see ``imaker.settings``)::

    queues/<queue>/job_<id>.tmp/   being written by a retriever: ignored
    queues/<queue>/job_<id>/       ready
    working/job_<id>/              claimed by a run (``.imaker/claim.json`` says which)
    archive/done/job_<id>/         processed
    archive/failed/job_<id>/       failed; ``error.json`` inside says why

Every move is a ``rename`` within one filesystem, so it is atomic: of two claimers
racing for the same bundle exactly one wins.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .bundle import BUNDLE_PREFIX, job_id_from_folder
from .fsutil import fsync_dir, write_json_atomic

CLAIM_DIR = ".imaker"
CLAIM_FILE = "claim.json"
ERROR_FILE = "error.json"
#: a claimed folder with no readable claim record is stale after this many seconds
UNOWNED_CLAIM_GRACE_S = 600.0


class QueueError(RuntimeError):
    pass


class JobNotFound(QueueError):
    pass


class ClaimLost(QueueError):
    """Another claimer took the job first."""


class JobBusy(QueueError):
    """The job is claimed by a run that is still alive."""


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ReadyJob:
    job_id: str
    queue: str
    path: Path
    arrived_ns: int  # ctime of the folder: rename into the queue updates it

    @property
    def order_key(self) -> tuple[int, str]:
        return (self.arrived_ns, self.path.name)


@dataclass(frozen=True)
class InvalidEntry:
    queue: str
    path: Path
    reason: str


@dataclass
class Claim:
    job_id: str
    queue: str
    attempt: int
    run_id: str | None
    pid: int
    host: str
    claimed_at: str
    updated_at: float = 0.0  # epoch seconds of the last stage that touched the claim

    def process_alive(self, grace_s: float = 60.0) -> bool | None:
        """True/False for a claim made on this host, None when it cannot be told.

        A claim is only dead once its process is gone *and* nothing has touched it for
        ``grace_s`` seconds: a multi-process run hands the claim from step to step."""
        if self.host != socket.gethostname():
            return None
        if time.time() - self.updated_at < grace_s:
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass(frozen=True)
class Owner:
    run_id: str | None = None
    pid: int = 0
    host: str = ""

    @classmethod
    def current(cls, run_id: str | None = None) -> "Owner":
        return cls(run_id=run_id, pid=os.getpid(), host=socket.gethostname())


class QueueStore:
    def __init__(self, queues: dict[str, Path], working_dir: Path, archive_dir: Path,
                 max_attempts: int = 3):
        self.queues = {name: Path(p) for name, p in queues.items()}
        self.working_dir = Path(working_dir)
        self.archive_dir = Path(archive_dir)
        self.max_attempts = max_attempts

    @classmethod
    def from_settings(cls, settings) -> "QueueStore":
        return cls(settings.queues, settings.working_dir, settings.archive_dir,
                   settings.max_claim_attempts)

    @property
    def done_dir(self) -> Path:
        return self.archive_dir / "done"

    @property
    def failed_dir(self) -> Path:
        return self.archive_dir / "failed"

    def ensure_dirs(self) -> None:
        for path in [*self.queues.values(), self.working_dir, self.done_dir, self.failed_dir]:
            path.mkdir(parents=True, exist_ok=True)

    # ----- discovery -----------------------------------------------------------------
    def scan(self) -> tuple[list[ReadyJob], list[InvalidEntry]]:
        """Ready bundles (oldest arrival first) and folders that can never be processed."""
        ready: list[ReadyJob] = []
        invalid: list[InvalidEntry] = []
        for queue, folder in self.queues.items():
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".") or name.endswith(".tmp") or not name.startswith(BUNDLE_PREFIX):
                    continue
                if entry.is_symlink():
                    invalid.append(InvalidEntry(queue, Path(entry.path),
                                                "bundle folder is a symlink; bundles must be real folders"))
                    continue
                if not entry.is_dir():
                    continue
                job_id = job_id_from_folder(name)
                if job_id is None:
                    invalid.append(InvalidEntry(
                        queue, Path(entry.path),
                        f"folder name {name!r} is not job_<id> with id matching "
                        "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"))
                    continue
                try:
                    arrived = entry.stat(follow_symlinks=False).st_ctime_ns
                except FileNotFoundError:
                    continue  # claimed meanwhile
                ready.append(ReadyJob(job_id, queue, Path(entry.path), arrived))
        ready.sort(key=lambda j: j.order_key)
        return ready, invalid

    def discover(self) -> list[ReadyJob]:
        return self.scan()[0]

    def reject(self, entry: InvalidEntry) -> Path | None:
        """Move a folder that can never become a job to ``failed/`` with its reason."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in entry.path.name)[:120]
        dest = self._free_name(self.failed_dir, safe or "job_invalid")
        try:
            os.rename(entry.path, dest)
        except FileNotFoundError:
            return None
        info = {"job_id": None, "stage": "queue", "error": entry.reason, "at": utcnow(),
                "queue": entry.queue, "original_name": entry.path.name}
        if dest.is_dir() and not dest.is_symlink():
            write_json_atomic(dest / ERROR_FILE, info)
        else:
            write_json_atomic(dest.with_name(dest.name + "." + ERROR_FILE), info)
        return dest

    # ----- where is a job? -------------------------------------------------------------
    def folder(self, job_id: str) -> str:
        return f"{BUNDLE_PREFIX}{job_id}"

    def locate(self, job_id: str) -> tuple[str, Path] | None:
        """(state, path): state is ``queue:<name>``, ``working``, ``done`` or ``failed``."""
        name = self.folder(job_id)
        candidates = [(f"queue:{q}", p / name) for q, p in self.queues.items()]
        candidates += [("working", self.working_dir / name), ("done", self.done_dir / name),
                       ("failed", self.failed_dir / name)]
        for state, path in candidates:
            if path.is_dir() and not path.is_symlink():
                return state, path
        return None

    def archived_count(self, job_id: str) -> int:
        """How many archived copies (done or failed) exist for this job id."""
        name = self.folder(job_id)
        count = 0
        for folder in (self.done_dir, self.failed_dir):
            try:
                count += sum(1 for e in os.scandir(folder)
                             if e.name == name or e.name.startswith(name + "@"))
            except FileNotFoundError:
                pass
        return count

    def run_key(self, job: ReadyJob) -> str:
        """Dagster run key for a ready bundle: the job id for its first submission, with a
        ``:N`` suffix when it was processed or attempted before (resubmission or recovery)."""
        n = self.archived_count(job.job_id) + self.read_attempts(job.path)
        return job.job_id if n == 0 else f"{job.job_id}:{n}"

    # ----- claims ----------------------------------------------------------------------
    def read_attempts(self, path: Path) -> int:
        try:
            data = json.loads((path / CLAIM_DIR / "attempts.json").read_text())
            return max(0, int(data.get("attempts", 0)))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    def read_claim(self, job_id: str) -> Claim | None:
        path = self.working_dir / self.folder(job_id) / CLAIM_DIR / CLAIM_FILE
        try:
            data = json.loads(path.read_text())
            return Claim(**data)
        except (OSError, ValueError, TypeError):
            return None

    def _write_claim(self, path: Path, job_id: str, queue: str, owner: Owner) -> Claim:
        claim = Claim(job_id=job_id, queue=queue, attempt=self.read_attempts(path) + 1,
                      run_id=owner.run_id, pid=owner.pid, host=owner.host, claimed_at=utcnow(),
                      updated_at=time.time())
        meta = path / CLAIM_DIR
        if meta.is_symlink():
            meta.unlink()
        meta.mkdir(exist_ok=True)
        write_json_atomic(meta / CLAIM_FILE, asdict(claim))
        write_json_atomic(meta / "attempts.json", {"attempts": claim.attempt})
        return claim

    def claim(self, job: ReadyJob, owner: Owner) -> Path:
        """Atomically move a ready bundle into ``working/``. Raises ClaimLost if another
        claimer got it first."""
        self.working_dir.mkdir(parents=True, exist_ok=True)
        dest = self.working_dir / job.path.name
        try:
            _rename_noreplace(job.path, dest)
        except FileNotFoundError:
            raise ClaimLost(f"job {job.job_id} was claimed by someone else") from None
        except FileExistsError:
            raise ClaimLost(f"job {job.job_id} is already in working/") from None
        fsync_dir(dest.parent)
        self._write_claim(dest, job.job_id, job.queue, owner)
        return dest

    def acquire(self, job_id: str, owner: Owner,
                is_alive: Callable[[Claim], bool] | None = None) -> tuple[str, Path]:
        """Get the bundle for a run wherever it is: claim it from a queue, take over a stale
        claim, take back a failed job for a retry, or read a done job in place (re-processing).
        Returns (state it was found in, path)."""
        found = self.locate(job_id)
        if found is None:
            raise JobNotFound(f"no bundle job_{job_id} in any queue, working/ or the archive")
        state, path = found
        if state.startswith("queue:"):
            queue = state.split(":", 1)[1]
            self.claim(ReadyJob(job_id, queue, path, 0), owner)
        elif state == "working":
            claim = self.read_claim(job_id)
            if claim is not None and claim.run_id == owner.run_id and owner.run_id is not None:
                self.touch(job_id, owner)
                return state, path
            if claim is not None and self._claim_alive(claim, is_alive):
                raise JobBusy(f"job {job_id} is being processed by run {claim.run_id} "
                              f"(pid {claim.pid} on {claim.host})")
            self._write_claim(path, job_id, claim.queue if claim else "unknown", owner)
        elif state == "failed":
            dest = self.working_dir / path.name
            _rename_noreplace(path, dest)
            (dest / ERROR_FILE).unlink(missing_ok=True)
            self._write_claim(dest, job_id, "retry", owner)
        else:  # done: reprocessing an archived job reads it where it is
            return state, path
        return state, self.working_dir / self.folder(job_id)

    def touch(self, job_id: str, owner: Owner) -> None:
        """Record that ``owner`` (a stage of the claiming run) is working on the job now."""
        claim = self.read_claim(job_id)
        if claim is None or claim.run_id != owner.run_id:
            return
        claim.pid, claim.host, claim.updated_at = owner.pid, owner.host, time.time()
        write_json_atomic(self.working_dir / self.folder(job_id) / CLAIM_DIR / CLAIM_FILE,
                          asdict(claim))

    @staticmethod
    def _claim_alive(claim: Claim, is_alive: Callable[[Claim], bool] | None) -> bool:
        if is_alive is not None:
            return is_alive(claim)
        alive = claim.process_alive()
        return True if alive is None else alive

    # ----- archiving -------------------------------------------------------------------
    def _free_name(self, folder: Path, name: str) -> Path:
        dest = folder / name
        if dest.exists() or dest.is_symlink():
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            dest = folder / f"{name}@{stamp}"
        return dest

    def _archive(self, job_id: str, folder: Path) -> Path:
        """Move the working copy into ``folder``; an older archived copy of the same job is
        renamed ``job_<id>@<timestamp>`` so the newest always has the plain name."""
        src = self.working_dir / self.folder(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / src.name
        if dest.exists():
            os.rename(dest, self._free_name(folder, src.name))
        os.rename(src, dest)
        fsync_dir(folder)
        return dest

    def archive_done(self, job_id: str) -> Path | None:
        if not (self.working_dir / self.folder(job_id)).is_dir():
            found = self.locate(job_id)
            return found[1] if found and found[0] == "done" else None
        dest = self._archive(job_id, self.done_dir)
        (dest / CLAIM_DIR / CLAIM_FILE).unlink(missing_ok=True)
        return dest

    def fail(self, job_id: str, stage: str, error: str) -> Path | None:
        """Archive the working copy to ``failed/`` with ``error.json``. A job that is not in
        working/ (e.g. re-processing a done job) is left where it is; returns None then."""
        if not (self.working_dir / self.folder(job_id)).is_dir():
            return None
        dest = self._archive(job_id, self.failed_dir)
        write_json_atomic(dest / ERROR_FILE,
                          {"job_id": job_id, "stage": stage, "error": error, "at": utcnow()})
        return dest

    def read_error(self, job_id: str) -> dict | None:
        try:
            return json.loads((self.failed_dir / self.folder(job_id) / ERROR_FILE).read_text())
        except (OSError, ValueError):
            return None

    # ----- recovery --------------------------------------------------------------------
    def recover_stale(self, is_alive: Callable[[Claim], bool] | None = None,
                      grace_s: float = UNOWNED_CLAIM_GRACE_S) -> list[tuple[str, str]]:
        """Return claims whose run died to their queue, or to ``failed/`` once they have
        used ``max_attempts``. Returns [(job_id, "requeued"|"failed")]."""
        actions: list[tuple[str, str]] = []
        try:
            entries = list(os.scandir(self.working_dir))
        except FileNotFoundError:
            return actions
        now = time.time()
        for entry in entries:
            job_id = job_id_from_folder(entry.name)
            if job_id is None or not entry.is_dir(follow_symlinks=False):
                continue
            claim = self.read_claim(job_id)
            if claim is None:
                try:
                    age = now - entry.stat(follow_symlinks=False).st_ctime
                except FileNotFoundError:
                    continue
                if age < grace_s:
                    continue  # just claimed; the claim record is being written
            elif self._claim_alive(claim, is_alive):
                continue
            attempts = self.read_attempts(Path(entry.path))
            if attempts >= self.max_attempts:
                self.fail(job_id, "recovery",
                          f"the run processing this job died {attempts} time(s) "
                          f"(last: {claim.run_id if claim else 'unknown'}); giving up")
                actions.append((job_id, "failed"))
                continue
            queue = claim.queue if claim and claim.queue in self.queues else next(iter(self.queues))
            dest = self.queues[queue] / entry.name
            try:
                (Path(entry.path) / CLAIM_DIR / CLAIM_FILE).unlink(missing_ok=True)
                _rename_noreplace(Path(entry.path), dest)
            except (FileExistsError, FileNotFoundError):
                continue
            actions.append((job_id, "requeued"))
        return actions


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _rename_noreplace(src: Path, dest: Path) -> None:
    """Atomic rename that refuses to replace an existing destination (plain rename()
    silently replaces an empty directory). Uses renameat2(RENAME_NOREPLACE) on Linux."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dest),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # unsupported filesystem: fall back
            raise OSError(err, os.strerror(err), str(src), None, str(dest))
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dest))
    os.rename(src, dest)
