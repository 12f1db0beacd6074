"""What a run's `stems` step uses to reach the separation service (standard library only:
a run process never imports torch).

``SEPARATOR_URL`` names the service. Left unset, the service is the one on loopback
(``127.0.0.1:SEPARATOR_PORT``), started on first use by whichever process needs it first
(``imaker separator serve`` detached, with an idle exit), so README command 1, ``imaker
ingest`` and the tests need nothing more. A service that is not reachable, or that dies
mid-separation, raises ``ServiceUnavailable`` (a ``TransientError``: the step is retried);
a separation the service reports as failed raises ``StageError``.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline import StageError, TransientError
from ..settings import Separation, Settings

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # the service sends a line at least every 5 s while it works
AUTOSTART_WAIT_S = 120.0
AUTOSTART_IDLE_EXIT_S = 900.0


class ServiceUnavailable(TransientError):
    pass


@dataclass
class SeparatorClient:
    url: str | None  # None: the auto-started loopback service on ``port``
    port: int = 8765
    separation: Separation = field(default_factory=Separation)  # sent with every request
    concurrency: int | None = None  # for an auto-started service

    @classmethod
    def from_settings(cls, settings: Settings) -> "SeparatorClient":
        return cls(settings.service.url, settings.service.port, settings.separation,
                   settings.service.concurrency)

    @property
    def address(self) -> str:
        return self.url or f"http://127.0.0.1:{self.port}"

    # ----- plumbing --------------------------------------------------------------------
    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(self.address)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)

    def health(self, timeout: float = 5.0) -> dict | None:
        """The service's /health answer, or None when nothing answers."""
        conn = self._conn(timeout)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return json.loads(resp.read()) if resp.status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def ensure_running(self, preload: bool = False) -> None:
        """Start the loopback service when none answers (only for ``url=None``); of several
        processes starting at once, one starts it (a file lock) and all wait for it.
        ``preload``: the service loads DEMUCS_MODEL before it answers (a warm-up)."""
        if self.url is not None or self.health() is not None:
            return
        from filelock import FileLock

        lock = Path(tempfile.gettempdir()) / f"imaker-separator-{self.port}.lock"
        with FileLock(str(lock), timeout=AUTOSTART_WAIT_S):
            if self.health() is not None:
                return
            log = Path(tempfile.gettempdir()) / f"imaker-separator-{self.port}.log"
            cmd = [sys.executable, "-m", "imaker.cli", "separator", "serve", "--host",
                   "127.0.0.1", "--port", str(self.port),
                   "--idle-exit", str(int(AUTOSTART_IDLE_EXIT_S))]
            if self.concurrency:
                cmd += ["--concurrency", str(self.concurrency)]
            if preload:
                cmd.append("--preload")
            with open(log, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        start_new_session=True, close_fds=True)
            deadline = time.monotonic() + AUTOSTART_WAIT_S
            while time.monotonic() < deadline:
                if self.health(timeout=2.0) is not None:
                    return
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
            raise ServiceUnavailable(
                f"could not start the separation service on {self.address} "
                f"(exit code {proc.poll()}); its log: {log}")

    # ----- the call --------------------------------------------------------------------
    def separate(self, job_id: str, source: Path, stems_dir: Path, on_event=None,
                 variants: list[str] | None = None) -> dict:
        """Separate ``source`` into ``stems_dir`` on the service for the ``variants`` the
        track makes (None: every variant); returns ``stems.json``."""
        self.ensure_running()
        body = json.dumps({"job_id": job_id, "source": str(Path(source).resolve()),
                           "stems_dir": str(Path(stems_dir).resolve()),
                           "separation": self.separation.model_dump(mode="json"),
                           "variants": variants}).encode()
        conn = self._conn(CONNECT_TIMEOUT_S)
        where = f"the separation service at {self.address}"
        try:
            try:
                conn.request("POST", "/separate", body=body,
                             headers={"Content-Type": "application/json"})
                conn.sock.settimeout(READ_TIMEOUT_S)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ServiceUnavailable(f"{where} is not reachable: {exc} (is it running? "
                                         "SEPARATOR_URL names it)") from None
            if resp.status != 200:
                try:
                    message = json.loads(resp.read()).get("message")
                except (ValueError, OSError, AttributeError):
                    message = None
                raise StageError(f"{where} refused the separation (HTTP {resp.status}): "
                                 f"{message or resp.reason}")
            fraction = 0.0
            while True:
                try:
                    raw = resp.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise ServiceUnavailable(
                        f"{where} stopped answering during the separation of {job_id} "
                        f"({fraction:.0%} done): {exc}") from None
                if not raw:
                    raise ServiceUnavailable(
                        f"{where} went away during the separation of {job_id} "
                        f"({fraction:.0%} done; the service died or was restarted)")
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if on_event is not None:
                    on_event(event)
                kind = event.get("event")
                fraction = float(event.get("fraction", fraction) or fraction)
                if kind == "done":
                    return event["stems"]
                if kind == "error":
                    raise StageError(f"separation failed on {self.address}: {event.get('message')}")
        finally:
            conn.close()
