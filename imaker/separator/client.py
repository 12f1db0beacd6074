"""What a run's `stems` step uses to reach the separation service (HTTP with the standard
library, filelock to auto-start one service at a time; a run process never imports torch).

``SEPARATOR_URL`` names the service. Left unset, the service is this checkout's on loopback
(``127.0.0.1:SEPARATOR_PORT``), started on first use by whichever process needs it first
(``imaker separator serve`` detached, with an idle exit) unless one runs already (README
command 1 starts its own), so ``imaker ingest`` and the tests need nothing more. A service
that is not reachable, or that dies mid-separation, raises ``ServiceUnavailable`` (a
``TransientError``: the step is retried); a separation the service reports as failed
raises ``StageError``.

*This checkout's* service: its /health reports an identity (``identity()``: the package
version, a hash of the ``imaker`` package's code, the Python environment, the model repo it
was started for). A service that answers on ``SEPARATOR_PORT`` with another identity
(another checkout or install, older code) is not used: this checkout's processes start their
own on another port, chosen once and recorded in a small file in the temp folder keyed by
the port and the identity (under the same file lock as the start), where all of them find it.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline import StageError, TransientError
from ..settings import Separation, Settings, as_text

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # the service sends a line at least every 5 s while it works
AUTOSTART_WAIT_S = 120.0
AUTOSTART_IDLE_EXIT_S = 900.0


class ServiceUnavailable(TransientError):
    pass


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the ``imaker`` package's ``.py`` files (names and contents), computed once
    per process: which code a separation service runs."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def service_identity(model_repo: str | None) -> dict:
    """What makes a separation service this checkout's: the version, the code and the Python
    environment of the process, and the model repo (``DEMUCS_MODEL_REPO``) it serves."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("instrumental-maker")
    except PackageNotFoundError:  # pragma: no cover - run from a tree that is not installed
        ver = None
    return {"version": ver, "code": code_fingerprint(),
            "python": os.path.realpath(sys.prefix),
            "model_repo": os.path.realpath(model_repo) if model_repo else None}


def fingerprint(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _port_free(port: int) -> bool:
    """Whether a service could listen on 127.0.0.1:``port`` now (as uvicorn binds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class SeparatorClient:
    url: str | None  # None: the auto-started loopback service on ``port``
    port: int = 8765
    separation: Separation = field(default_factory=Separation)  # sent with every request
    concurrency: int | None = None  # for an auto-started service
    #: the port of this checkout's service once found (``port``, or the one used instead)
    _service_port: int | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "SeparatorClient":
        return cls(settings.service.url, settings.service.port, settings.separation,
                   settings.service.concurrency)

    @property
    def address(self) -> str:
        return self.url or f"http://127.0.0.1:{self._service_port or self.port}"

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

    # ----- this checkout's loopback service ------------------------------------------------
    def identity(self) -> dict:
        return service_identity(self.separation.model_repo)

    def is_ours(self, health: dict | None) -> bool:
        """Whether a /health answer comes from a service this client may use: the same
        version, code and Python environment, and the same model repo when the client names
        one. (A service too old to report them is another install's.)"""
        if not health:
            return False
        mine = self.identity()
        keys = [k for k in mine if k != "model_repo" or mine[k] is not None]
        theirs = health.get("identity") or {}
        return all(k in theirs and theirs[k] == mine[k] for k in keys)

    def _health_at(self, port: int, timeout: float = 5.0) -> dict | None:
        return SeparatorClient(url=f"http://127.0.0.1:{port}").health(timeout)

    def _state_file(self) -> Path:
        """Where this checkout records the port it uses when ``port`` is another's."""
        key = fingerprint(self.identity())[:16]
        return Path(tempfile.gettempdir()) / f"imaker-separator-{self.port}-{key}.json"

    def start_lock(self):
        """The file lock under which a process of this checkout finds or starts the
        service (``ensure_running``; ``imaker separator serve`` holds it until it listens)."""
        from filelock import FileLock

        lock = Path(tempfile.gettempdir()) / f"imaker-separator-{self.port}.lock"
        return FileLock(str(lock), timeout=AUTOSTART_WAIT_S)

    def find_running(self) -> bool:
        """Use this checkout's service when one answers: the one recorded for this identity
        (when ``port`` is another's), else the one on ``port``."""
        candidates = [self.port]
        try:
            candidates.insert(0, int(json.loads(self._state_file().read_text())["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for port in dict.fromkeys(candidates):
            if self.is_ours(self._health_at(port)):
                self._service_port = port
                return True
        return False

    def port_to_start(self) -> int:
        """Under ``start_lock``, with no service of ours answering: ``port`` when it is free,
        else (another checkout's service, or any other program, holds it) a free port,
        recorded for the other processes of this checkout."""
        if _port_free(self.port):
            return self.port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        state = self._state_file()
        tmp = state.with_name(state.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"port": port, "instead_of": self.port,
                                   "identity": self.identity()}))
        os.replace(tmp, state)
        return port

    def ensure_running(self, preload: bool = False) -> None:
        """Find this checkout's loopback service, or start it (only for ``url=None``); of
        several processes starting at once, one starts it (a file lock) and all wait for it.
        ``preload``: the service loads DEMUCS_MODEL before it answers (a warm-up)."""
        if self.url is not None or self.find_running():
            return
        with self.start_lock():
            if self.find_running():
                return
            port = self.port_to_start()
            log = Path(tempfile.gettempdir()) / f"imaker-separator-{port}.log"
            cmd = [sys.executable, "-m", "imaker.cli", "separator", "serve", "--host",
                   "127.0.0.1", "--port", str(port),
                   "--idle-exit", str(int(AUTOSTART_IDLE_EXIT_S))]
            if self.concurrency:
                cmd += ["--concurrency", str(self.concurrency)]
            if preload:
                cmd.append("--preload")
            # the service serves (and reports) this client's separation settings, whatever
            # the environment: each field it sets as its own variable (None: the service's)
            env = dict(os.environ)
            for name, info in type(self.separation).model_fields.items():
                value = as_text(getattr(self.separation, name))
                if value is not None:
                    env[info.alias] = value
            with open(log, "ab") as out:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        env=env, start_new_session=True, close_fds=True)
            deadline = time.monotonic() + AUTOSTART_WAIT_S
            while time.monotonic() < deadline:  # polled: a starting service has no other signal
                health = self._health_at(port, timeout=2.0)
                if health is not None:
                    if not self.is_ours(health):
                        raise ServiceUnavailable(
                            f"the separation service started on 127.0.0.1:{port} reports "
                            f"{health.get('identity')}, not {self.identity()}")
                    self._service_port = port
                    return
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
            raise ServiceUnavailable(
                f"could not start the separation service on 127.0.0.1:{port} "
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
