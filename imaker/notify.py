"""Notifications (``NOTIFY_URLS``): one message per track when it is done or has failed,
sent with Apprise (https://github.com/caronc/apprise, the URLs Pinchflat users know).

No Dagster here: the notification sensors (``sensors/notify_sensor.py``) decide *when* a
track's outcome is final and call ``outcome_done`` / ``outcome_failed`` + ``send``.
A notification that cannot be delivered is reported back (a warning), never raised: it
must not fail or hold up the track.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .bundle import BundleError, read_json_file, read_manifest

#: the outcomes a notification can be sent for (``NOTIFY_ON``)
_MAX_FIELD = 300   # a hostile job.json must not make a huge message
_MAX_REASON = 1500


def _text(value, limit: int = _MAX_FIELD) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"


@dataclass(frozen=True)
class TrackOutcome:
    """What a message says about one track."""

    job_id: str
    state: str                        # "done" | "failed"
    title: str | None = None
    artist: str | None = None
    album: str | None = None
    variants: tuple[str, ...] = ()    # done: the variants made (instrumental, no_drums, ...)
    folder: str | None = None         # done: outputs/<job_id>
    stage: str | None = None          # failed: the step that failed (source_audio, run, ...)
    reason: str | None = None         # failed: why

    @property
    def name(self) -> str:
        """"Artist - Title" when known, else the job id."""
        if self.title and self.artist:
            return f"{self.artist} - {self.title}"
        return self.title or self.artist or self.job_id


def outcome_done(outputs_dir: Path, job_id: str) -> TrackOutcome:
    """A finished track, described by ``outputs/<job_id>/manifest.json``."""
    folder = Path(outputs_dir) / job_id
    try:
        data = read_manifest(folder)
    except BundleError:
        data = {}
    variants: list[str] = []
    for art in data.get("artifacts") or []:
        name = _text(art.get("variant")) if isinstance(art, dict) else None
        if name and name not in variants:
            variants.append(name)
    return TrackOutcome(job_id=job_id, state="done", title=_text(data.get("title")),
                        artist=_text(data.get("artist")), album=_text(data.get("album")),
                        variants=tuple(variants), folder=str(folder))


def outcome_failed(job_id: str, stage: str, reason: str,
                   bundle_dir: Path | None = None) -> TrackOutcome:
    """A failed track; title and artist from its bundle's job.json when it is readable."""
    meta: dict = {}
    if bundle_dir is not None:
        try:
            loaded = read_json_file(Path(bundle_dir) / "job.json")
            meta = loaded if isinstance(loaded, dict) else {}
        except BundleError:
            pass
    return TrackOutcome(job_id=job_id, state="failed", title=_text(meta.get("title")),
                        artist=_text(meta.get("artist")), album=_text(meta.get("album")),
                        stage=_text(stage, 100) or "unknown",
                        reason=_text(reason, _MAX_REASON) or "unknown reason")


def message(outcome: TrackOutcome) -> tuple[str, str]:
    """(title, body) of the notification."""
    if outcome.state == "done":
        title = f"Instrumental ready: {outcome.name}"
        lines = [f"{outcome.name} is done (job {outcome.job_id}).",
                 f"Variants: {', '.join(outcome.variants) or 'none'}",
                 f"Folder: {outcome.folder}"]
    else:
        title = f"Instrumental failed: {outcome.name}"
        lines = [f"{outcome.name} failed (job {outcome.job_id}) at {outcome.stage}.",
                 f"Reason: {outcome.reason}"]
    if outcome.album:
        lines.insert(1, f"Album: {outcome.album}")
    return title, "\n".join(lines)


@dataclass(frozen=True)
class SendResult:
    ok: bool
    detail: str = ""   # why it failed (Apprise's warnings), for the log


def send(urls: tuple[str, ...], outcome: TrackOutcome, timeout_s: float = 10.0) -> SendResult:
    """Send the outcome to every URL. Never raises: a receiver that is down, slow or
    refusing gives ``ok=False`` and Apprise's reason. ``timeout_s`` bounds each request
    (connect and read) so a dead receiver cannot hold up the caller for long."""
    if not urls:
        return SendResult(True)
    try:
        import apprise

        title, body = message(outcome)
        notify_type = (apprise.NotifyType.SUCCESS if outcome.state == "done"
                       else apprise.NotifyType.FAILURE)
        with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as captured:
            sender = apprise.Apprise()
            rejected = sum(1 for url in urls if not sender.add(url))  # checked by settings
            for server in sender:
                # Apprise's defaults are 4 s to connect + 4 s to read; keep them bounded
                if hasattr(server, "socket_connect_timeout"):
                    server.socket_connect_timeout = min(server.socket_connect_timeout, timeout_s)
                    server.socket_read_timeout = min(server.socket_read_timeout, timeout_s)
            ok = bool(len(sender)) and bool(sender.notify(body=body, title=title,
                                                            notify_type=notify_type))
            detail = "; ".join(captured.getvalue().split("\n")).strip("; ")
        if rejected:
            ok, detail = False, f"{rejected} URL(s) not usable by Apprise. {detail}".strip()
        return SendResult(ok, "" if ok else (detail or "Apprise could not send it"))
    except Exception as exc:  # noqa: BLE001 - a notification must never fail the caller
        return SendResult(False, f"{type(exc).__name__}: {exc}")
