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

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from .bundle import BUNDLE_PREFIX, BundleError, job_id_from_folder, read_json_file
from .fsutil import fsync_dir, rename_noreplace, write_json_atomic

CLAIM_DIR = ".imaker"
CLAIM_FILE = "claim.json"
ERROR_FILE = "error.json"
#: a folder in working/ with no claim record yet (its claimer died between the rename and
#: writing the record) gets one from the reconciler after this many seconds
UNRECORDED_CLAIM_GRACE_S = 60.0


class QueueError(RuntimeError):
    pass


class JobNotFound(QueueError):
    pass


class ClaimLost(QueueError):
    """Another claimer took the job first."""


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_drop_id() -> str:
    """Identifies one drop of a bundle (one claim): the runs that process it carry it as the
    ``imaker/drop_id`` tag, so exactly one run lineage belongs to each drop."""
    return uuid.uuid4().hex[:16]


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


@dataclass(frozen=True)
class Claim:
    """A bundle in working/: which drop it is and who claimed it. No pid or heartbeat: a
    claim lives exactly as long as the Dagster runs of its drop (see ``imaker_assets.lifecycle``)."""

    job_id: str
    queue: str
    drop_id: str
    claimed_at: str
    by: str = ""


class QueueStore:
    def __init__(self, queues: dict[str, Path], working_dir: Path, archive_dir: Path):
        self.queues = {name: Path(p) for name, p in queues.items()}
        self.working_dir = Path(working_dir)
        self.archive_dir = Path(archive_dir)

    @classmethod
    def from_settings(cls, settings) -> "QueueStore":
        return cls(settings.paths.queues, settings.paths.working_dir, settings.paths.archive_dir)

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

    # ----- claims ----------------------------------------------------------------------
    def read_claim(self, job_id: str, folder: Path | None = None) -> Claim | None:
        path = (folder or self.working_dir / self.folder(job_id)) / CLAIM_DIR / CLAIM_FILE
        try:
            data = json.loads(path.read_text())
            return Claim(job_id=str(data["job_id"]), queue=str(data["queue"]),
                         drop_id=str(data["drop_id"]), claimed_at=str(data["claimed_at"]),
                         by=str(data.get("by", "")))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def _record_claim(self, path: Path, claim: Claim) -> Claim:
        """Write the claim record once: of two writers exactly one wins (hard link of a
        complete temp file, which fails when the record exists); returns the record that
        is there afterwards."""
        meta = path / CLAIM_DIR
        if meta.is_symlink() or (meta.exists() and not meta.is_dir()):
            meta.unlink()
        meta.mkdir(exist_ok=True)
        tmp = meta / f".claim.{claim.drop_id}.part"
        tmp.write_text(json.dumps(asdict(claim), indent=2) + "\n")
        try:
            os.link(tmp, meta / CLAIM_FILE)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(meta)
        return self.read_claim(claim.job_id, path) or claim

    def claim(self, job: ReadyJob, by: str) -> Claim:
        """Atomically move a ready bundle into ``working/`` as a new drop. Raises ClaimLost
        if another claimer (the sensor, another ``imaker ingest``) got it first."""
        self.working_dir.mkdir(parents=True, exist_ok=True)
        dest = self.working_dir / job.path.name
        try:
            rename_noreplace(job.path, dest)
        except FileNotFoundError:
            raise ClaimLost(f"job {job.job_id} was claimed by someone else") from None
        except FileExistsError:
            raise ClaimLost(f"job {job.job_id} is already in working/ (in progress)") from None
        fsync_dir(dest.parent)
        return self._record_claim(dest, Claim(job.job_id, job.queue, new_drop_id(), utcnow(), by))

    def claims(self, grace_s: float = UNRECORDED_CLAIM_GRACE_S) -> list[Claim]:
        """Every claim in working/. A folder whose claimer died before recording the claim
        gets a record (a new drop) once it is ``grace_s`` old."""
        out: list[Claim] = []
        try:
            entries = list(os.scandir(self.working_dir))
        except FileNotFoundError:
            return out
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
                    continue
                claim = self._record_claim(Path(entry.path), Claim(
                    job_id, "unknown", new_drop_id(), utcnow(), "reconciler"))
            out.append(claim)
        return out

    def claimed_path(self, job_id: str, drop_id: str) -> Path | None:
        """working/job_<id> when it holds this drop, else None."""
        claim = self.read_claim(job_id)
        if claim is None or claim.drop_id != drop_id:
            return None
        return self.working_dir / self.folder(job_id)

    def settled(self, job_id: str, drop_id: str) -> tuple[str, Path] | None:
        """("done"|"failed", archived folder) once this drop has left working/."""
        for state, folder in (("done", self.done_dir), ("failed", self.failed_dir)):
            path = folder / self.folder(job_id)
            claim = self.read_claim(job_id, path)
            if claim is not None and claim.drop_id == drop_id:
                return state, path
        return None

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

    def archive_done(self, job_id: str, drop_id: str) -> Path | None:
        """Archive this drop to ``done/`` (its claim record goes with it). A drop that was
        archived to ``failed/`` and is now processed after all (re-executed from the UI)
        moves from there to ``done/``, its ``error.json`` kept as history. A run without
        this drop (a re-materialization from the UI) leaves the archive alone."""
        if self.claimed_path(job_id, drop_id) is not None:
            return self._archive(job_id, self.done_dir)
        where = self.settled(job_id, drop_id)
        if where is None or where[0] != "failed":
            return None
        src = where[1]
        self._keep_error(src)
        done = self.done_dir / src.name
        self.done_dir.mkdir(parents=True, exist_ok=True)
        if done.exists():
            os.rename(done, self._free_name(self.done_dir, src.name))
        os.rename(src, done)
        fsync_dir(self.done_dir)
        return done

    def _keep_error(self, folder: Path) -> None:
        error = folder / ERROR_FILE
        if error.is_file():
            history = folder / CLAIM_DIR / "history"
            history.mkdir(parents=True, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            os.rename(error, history / f"error-{stamp}.json")

    def fail(self, job_id: str, drop_id: str, stage: str, error: str) -> Path | None:
        """Archive this drop to ``failed/`` with ``error.json`` (job_id, stage, error, at).
        Returns None when the drop is not in working/ (settled already)."""
        if self.claimed_path(job_id, drop_id) is None:
            where = self.settled(job_id, drop_id)
            if where is not None and where[0] == "failed":  # a re-execution failed again
                write_json_atomic(where[1] / ERROR_FILE, {"job_id": job_id, "stage": stage,
                                                          "error": error, "at": utcnow()})
                return where[1]
            return None
        src = self.working_dir / self.folder(job_id)
        # error.json first, then the rename: the reason is never missing in failed/
        write_json_atomic(src / ERROR_FILE,
                          {"job_id": job_id, "stage": stage, "error": error, "at": utcnow()})
        return self._archive(job_id, self.failed_dir)

    def requeue_failed(self, job_id: str) -> Path:
        """Put a failed job back into the queue it came from (``imaker retry``): its
        ``error.json`` is kept as history in ``.imaker/history/``; the next claim is a new
        drop. Raises JobNotFound when there is no failed copy."""
        src = self.failed_dir / self.folder(job_id)
        if not src.is_dir() or src.is_symlink():
            raise JobNotFound(f"no failed bundle job_{job_id} in {self.failed_dir}")
        claim = self.read_claim(job_id, src)
        queue = claim.queue if claim and claim.queue in self.queues else "other"
        self._keep_error(src)
        (src / CLAIM_DIR / CLAIM_FILE).unlink(missing_ok=True)
        dest = self.queues[queue] / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        rename_noreplace(src, dest)
        fsync_dir(dest.parent)
        return dest

    def read_failure(self, job_id: str) -> tuple[str, str] | None:
        """(stage, reason) of the failed bundle of ``job_id`` (``read_failure``)."""
        return read_failure(self.failed_dir / self.folder(job_id))


#: an error.json is a few hundred bytes; a bigger one is not ours
_MAX_ERROR_JSON = 4 * 1024 * 1024


def read_failure(bundle_dir: Path | None) -> tuple[str, str] | None:
    """(stage, reason) from the ``error.json`` a failed step left beside a bundle in
    ``archive/failed/`` (read defensively: the folder is user-writable); None when there is
    none or it is not ours."""
    if bundle_dir is None:
        return None
    try:
        data = read_json_file(Path(bundle_dir) / ERROR_FILE, max_bytes=_MAX_ERROR_JSON)
    except BundleError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return None
    stage = data.get("stage")
    return (stage if isinstance(stage, str) else "unknown"), data["error"]
