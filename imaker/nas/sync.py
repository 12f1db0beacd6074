"""Sync one job's artifacts to the NAS, as the manifest lists them.

``sync_job(output_dir, config)`` routes every artifact of ``output_dir/manifest.json`` by
its kind/variant (first matching route wins), copies it with the destination's backend
unless the destination already holds the same bytes, and records the outcome per artifact
in ``output_dir/sync.json`` (written atomically, also when something failed).
``sync_all(outputs_dir, config)`` does that for every job whose sync is missing or out of
date (manifest or routes changed, or the last sync failed).
"""

from __future__ import annotations

import fcntl
import json
import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ..bundle import BundleError, JobManifest, manifest_dirs
from ..fsutil import safe_filename, sha256_file, write_json_atomic
from .backends import DIFFERENT, MISSING, SAME, Backend, make_backend
from .config import NasConfig, NasConfigError, Route, load_config
from .errors import DestinationUnavailable, SyncError

SYNC_FILE = "sync.json"
SYNC_SCHEMA_VERSION = 1
LOCK_FILE = ".sync.lock"
MAX_KEEP_BOTH = 1000
#: per-artifact statuses that leave the destination holding the artifact
DONE = ("copied", "replaced", "kept-both", "unchanged")

logger = logging.getLogger("imaker.nas")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ArtifactSync:
    path: str  # relative to outputs/<job_id>/
    kind: str
    variant: str
    status: str  # copied | replaced | kept-both | unchanged | skipped | unrouted | failed
    sha256: str
    bytes: int
    bytes_sent: int = 0
    destination: str | None = None  # full address of the file (no secrets)
    backend: str | None = None
    route: str | None = None
    target: str | None = None  # path below the route's destination
    base: str | None = None  # the route's destination
    time: str = ""
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class SyncResult:
    job_id: str
    status: str  # ok | failed | skipped
    artifacts: list[ArtifactSync] = field(default_factory=list)
    reason: str | None = None
    sync_json: Path | None = None
    time: str = ""

    @property
    def bytes_sent(self) -> int:
        return sum(a.bytes_sent for a in self.artifacts)

    def count(self, *statuses: str) -> int:
        return sum(1 for a in self.artifacts if a.status in statuses)

    @property
    def failures(self) -> list[ArtifactSync]:
        return [a for a in self.artifacts if a.status == "failed"]

    def error_message(self) -> str:
        lines = [f"{a.path}: {a.message}" for a in self.failures]
        return f"NAS sync of {self.job_id} failed for {len(lines)} artifact(s): " + "; ".join(lines)

    def raise_for_status(self) -> None:
        if self.status == "failed":
            raise SyncError(self.error_message())

    def summary(self) -> str:
        if self.status == "skipped":
            return f"{self.job_id}: skipped: {self.reason}"
        parts = [f"{n} {s}" for s in ("copied", "replaced", "kept-both", "unchanged", "skipped",
                                      "unrouted", "failed") if (n := self.count(s))]
        return f"{self.job_id}: {self.status}: {', '.join(parts) or 'no artifacts'}; " \
               f"{self.bytes_sent} bytes sent"


# ---------------------------------------------------------------------------------------
def resolve_config(enabled: bool, config_path: Path | str | None) -> tuple[NasConfig | None, str]:
    """The config to sync with, or None and why sync is skipped. A config file that exists
    but is invalid raises NasConfigError (a broken config must not pass silently)."""
    if not enabled:
        return None, "NAS sync is disabled (NAS_SYNC_ENABLED is false)"
    if config_path is None:
        return None, "NAS sync is not configured (NAS_SYNC_CONFIG_PATH is not set)"
    path = Path(config_path)
    if not path.is_file():
        return None, f"NAS sync is not configured: no config file at {path}"
    config = load_config(path)
    if not config.enabled:
        return None, f"NAS sync is disabled in {path} (nasSync.enabled: false)"
    return config, ""


def _render_name(route: Route, manifest: JobManifest, art_path: str, kind: str,
                 variant: str) -> str:
    filename = PurePosixPath(art_path).name
    p = PurePosixPath(filename)
    values = {"filename": filename, "stem": p.stem, "ext": p.suffix.lstrip("."),
              "job_id": manifest.job_id, "artist": manifest.artist,
              "album": manifest.album or "Unknown Album", "title": manifest.title,
              "kind": kind, "variant": variant}
    safe = {k: (v if k == "ext" else safe_filename(str(v))) for k, v in values.items()}
    rel = re.sub(r"\{([a-z_]+)\}", lambda m: safe[m.group(1)], route.name)
    parts = [part for part in rel.split("/") if part not in ("", ".")]
    if not parts or any(part == ".." for part in parts):
        raise SyncError(f"name template {route.name!r} gives an unusable path {rel!r}")
    return "/".join(parts)


def _keep_both_name(rel: str, n: int) -> str:
    p = PurePosixPath(rel)
    return str(p.with_name(f"{p.stem} ({n}){p.suffix}"))


class _Session:
    """Backends of one sync pass, one per destination (connections are reused)."""

    def __init__(self, config: NasConfig):
        self.config = config
        self.backends: dict[tuple, Backend] = {}
        self.down: dict[tuple, str] = {}

    def key(self, route: Route) -> tuple:
        return (route.destination, json.dumps(self.config.options_for(route), sort_keys=True))

    def backend(self, route: Route) -> Backend:
        key = self.key(route)
        if key in self.down:
            raise DestinationUnavailable(self.down[key])
        backend = self.backends.get(key)
        if backend is None:
            backend = self.backends[key] = make_backend(route.destination,
                                                        self.config.options_for(route))
        try:
            backend.ensure_checked()
        except DestinationUnavailable as exc:
            self.down[key] = str(exc)
            raise
        return backend

    def close(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception:  # noqa: BLE001 - closing must not hide the result
                pass


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def job_lock(output_dir: Path) -> Iterator[None]:
    """One sync of a job at a time, across threads and processes (the asset and the
    ``imaker nas-sync`` service may run side by side)."""
    key = str(Path(output_dir).resolve())
    with _THREAD_LOCKS_GUARD:
        tlock = _THREAD_LOCKS.setdefault(key, threading.Lock())
    with tlock:
        with open(Path(output_dir) / LOCK_FILE, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_sync_record(output_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(output_dir) / SYNC_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def sync_job(output_dir: Path, config: NasConfig | None, *, log=None,
             skip_reason: str = "NAS sync is not configured") -> SyncResult:
    """Sync one job folder (``outputs/<job_id>/``). Never raises for a failed copy: the
    result says ``failed`` and lists why (call ``raise_for_status()``); raises only when
    the folder has no readable manifest."""
    log = log or logger
    output_dir = Path(output_dir)
    manifest_path = output_dir / JobManifest.FILENAME
    if not manifest_path.is_file():
        raise SyncError(f"{output_dir} has no {JobManifest.FILENAME}; nothing to sync")
    manifest = _load_manifest(output_dir)
    if config is None or not config.enabled:
        log.warning(f"{manifest.job_id}: {skip_reason}; artifacts stay in {output_dir}")
        return SyncResult(manifest.job_id, "skipped", reason=skip_reason, time=_now())

    with job_lock(output_dir):
        manifest = _load_manifest(output_dir)  # re-read under the lock
        manifest_sha = sha256_file(manifest_path)
        previous = {a.get("path"): a for a in (read_sync_record(output_dir) or {}).get("artifacts", [])
                    if isinstance(a, dict)}
        session = _Session(config)
        results = []
        try:
            for art in manifest.artifacts:
                results.append(_sync_artifact(session, manifest, output_dir, art,
                                              previous.get(art.path), log))
        finally:
            session.close()
        status = "failed" if any(r.status == "failed" for r in results) else "ok"
        result = SyncResult(manifest.job_id, status, results, time=_now(),
                            sync_json=output_dir / SYNC_FILE)
        write_json_atomic(output_dir / SYNC_FILE, {
            "schema_version": SYNC_SCHEMA_VERSION, "job_id": manifest.job_id,
            "status": status, "synced_at": result.time, "manifest_sha256": manifest_sha,
            "config": config.source, "config_fingerprint": config.fingerprint,
            "bytes_sent": result.bytes_sent,
            "artifacts": [r.to_dict() for r in results]})
    (log.warning if status == "failed" else log.info)(result.summary())
    return result


def _load_manifest(output_dir: Path) -> JobManifest:
    try:
        return JobManifest.load(output_dir)
    except BundleError as exc:
        raise SyncError(f"{output_dir}: {exc}") from None


def _sync_artifact(session: _Session, manifest: JobManifest, output_dir: Path, art,
                   prev: dict | None, log) -> ArtifactSync:
    rec = ArtifactSync(path=art.path, kind=art.kind, variant=art.variant, status="failed",
                       sha256=art.sha256, bytes=art.size_bytes, time=_now())
    route = session.config.route_for(art.kind, art.variant)
    if route is None:
        rec.status = "unrouted"
        rec.message = f"no route matches kind={art.kind} variant={art.variant}; not synced"
        log.warning(f"{manifest.job_id}: {art.path}: {rec.message}")
        return rec
    rec.route, rec.backend = route.describe(), route.destination.backend
    rec.base = route.destination.url()
    try:
        local = output_dir / art.path
        if not local.is_file():
            raise SyncError(f"{local} is missing from the outputs")
        if local.stat().st_size != art.size_bytes or sha256_file(local) != art.sha256:
            raise SyncError(f"{local} does not match its manifest entry (size/sha256); "
                            f"re-materialize the manifest")
        rel = _render_name(route, manifest, art.path, art.kind, art.variant)
        rec.target, rec.destination = rel, route.destination.url(rel)
        backend = session.backend(route)
        size, sha = art.size_bytes, art.sha256

        # fast path: synced before to this very place with these bytes
        if prev and prev.get("status") in DONE and prev.get("sha256") == sha \
                and prev.get("base") == rec.base and prev.get("target"):
            if backend.compare(prev["target"], size, sha, deep=False, local=local) == SAME:
                rec.status, rec.target = "unchanged", prev["target"]
                rec.destination = route.destination.url(prev["target"])
                return rec

        state = backend.compare(rel, size, sha, local=local)
        if state == SAME:
            rec.status = "unchanged"
        elif state == MISSING:
            rec.bytes_sent = backend.put(local, rel, size, sha)
            rec.status = "copied"
        elif route.collision == "overwrite":
            rec.bytes_sent = backend.put(local, rel, size, sha)
            rec.status = "replaced"
            log.info(f"{manifest.job_id}: replaced {rec.destination} (content changed)")
        elif route.collision == "skip":
            rec.status = "skipped"
            rec.message = f"{rec.destination} exists with different content; left as is " \
                          f"(collision: skip)"
            log.warning(f"{manifest.job_id}: {rec.message}")
        else:  # keep-both
            for n in range(2, MAX_KEEP_BOTH):
                alt = _keep_both_name(rel, n)
                alt_state = backend.compare(alt, size, sha, local=local)
                if alt_state == SAME:
                    rec.status = "unchanged"
                    break
                if alt_state == MISSING:
                    rec.bytes_sent = backend.put(local, alt, size, sha)
                    rec.status = "kept-both"
                    break
            else:
                raise SyncError(f"keep-both: {MAX_KEEP_BOTH} versions of {rec.destination} "
                                f"already exist")
            rec.target, rec.destination = alt, route.destination.url(alt)
        if rec.status in ("copied", "replaced", "kept-both"):
            log.info(f"{manifest.job_id}: {art.path} -> {rec.destination} "
                     f"({rec.bytes_sent} bytes, verified)")
    except SyncError as exc:
        rec.status, rec.message = "failed", str(exc)
        log.error(f"{manifest.job_id}: {art.path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - one artifact must not hide the others
        rec.status, rec.message = "failed", f"{type(exc).__name__}: {exc}"
        log.error(f"{manifest.job_id}: {art.path}: {rec.message}")
    rec.time = _now()
    return rec


# ---------------------------------------------------------------------------------------
def needs_sync(output_dir: Path, config: NasConfig) -> bool:
    """True when a job has no sync record, or its manifest, the routes or the last result
    say it must be synced again."""
    record = read_sync_record(output_dir)
    if not record or record.get("status") != "ok":
        return True
    if record.get("config_fingerprint") != config.fingerprint:
        return True
    try:
        return record.get("manifest_sha256") != sha256_file(Path(output_dir) / JobManifest.FILENAME)
    except OSError:
        return True


def pending_jobs(outputs_dir: Path, config: NasConfig) -> list[Path]:
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        return []
    return [job for job in manifest_dirs(outputs_dir) if needs_sync(job, config)]


def sync_all(outputs_dir: Path, config: NasConfig, *, once: bool = True,
             interval: float = 30.0, stop: threading.Event | None = None, log=None,
             force: bool = False) -> list[SyncResult]:
    """Sync every job under ``outputs_dir`` that is not synced or out of date. With
    ``once=False`` keep scanning every ``interval`` seconds until ``stop`` is set; a
    failing job is logged and retried on the next pass. Returns the results of the last
    pass (all passes' results when ``once``)."""
    log = log or logger
    stop = stop or threading.Event()
    while True:
        results = []
        outputs = Path(outputs_dir)
        jobs = manifest_dirs(outputs) if force else pending_jobs(outputs, config)
        for job_dir in jobs:
            if stop.is_set():
                break
            try:
                results.append(sync_job(job_dir, config, log=log))
            except (SyncError, OSError, ValueError, KeyError) as exc:
                log.error(f"{job_dir.name}: cannot sync: {exc}")
                results.append(SyncResult(job_dir.name, "failed", reason=str(exc), time=_now()))
        if once or stop.wait(interval):
            return results


__all__ = ["ArtifactSync", "SyncResult", "sync_job", "sync_all", "needs_sync", "pending_jobs",
           "resolve_config", "read_sync_record", "NasConfigError", "SyncError",
           "DestinationUnavailable", "DIFFERENT"]
