"""Start `dagster dev` / `dagster-webserver` / README command 1's `scripts/serve.sh` on a free
loopback port for a test, and stop it the way a supervisor does: SIGTERM to the process,
then every process it started must be gone within ``STOP_TIMEOUT_S`` (the test fails
otherwise; whatever is left is killed only so that it does not outlive the test)."""

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parents[1]
#: README command 1's promise: SIGTERM stops every process it started within this
STOP_TIMEOUT_S = 30.0
#: what the scripts and servers the tests start stop on
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_signals() -> None:
    """``preexec_fn`` for the long-lived processes the tests start and stop: HUP, INT, QUIT
    and TERM at their defaults, whatever the test process has. An ignored signal is
    inherited across exec (bash cannot even trap it), and a pytest started in the
    background or under nohup has INT and QUIT (and HUP) ignored."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def process_tree(pid: int, *, session: int | None = None) -> dict[int, str]:
    """``pid`` and all its descendants now, from /proc: {pid: command line}; with
    ``session``, only those in that session (a process that started its own session, as
    the auto-started separation service does, left on purpose, with its descendants)."""
    children: dict[int, list[int]] = {}
    sessions: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        p = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(p)
        sessions[p] = int(fields[3])
    tree: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        if session is not None and sessions.get(p) != session:
            continue
        try:
            cmd = (Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
                   .decode(errors="replace").strip())
        except OSError:
            continue
        tree[p] = cmd
        todo += children.get(p, [])
    return tree


def stop_and_check(proc: subprocess.Popen, tree: dict[int, str], *,
                   timeout: float = STOP_TIMEOUT_S) -> float:
    """SIGTERM to ``proc`` alone; every process of ``tree`` (collected before) must exit
    within ``timeout``. Returns the seconds it took. The processes are watched through
    pidfds (opened before the signal: no pid reuse), which become readable when they exit;
    those still running at the deadline are SIGKILLed, then the assertion fails."""
    fds: dict[int, int] = {}
    for pid in tree:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    started = time.monotonic()
    try:
        proc.send_signal(signal.SIGTERM)
        pending = set(fds)
        while pending:
            left = started + timeout - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(pending), [], [], left)
            pending -= set(ready)
        took = time.monotonic() - started
        leftover = {fds[fd]: tree[fds[fd]] for fd in pending}
        for fd in pending:  # last resort: the test fails below, but leaks nothing
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
    finally:
        for fd in fds:
            os.close(fd)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not leftover, (f"still running {timeout:.0f} s after SIGTERM to {proc.pid} "
                          f"(killed now): {leftover}")
    return took


class Server:
    """A started server: ``proc``, ``url``, ``log``; ``stop()`` stops it as a supervisor
    does and checks that nothing it started is left (once; the context manager calls it)."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path, detached: bool = False):
        self.proc, self.url, self.log, self.detached = proc, url, log, detached
        self.stopped_tree: dict[int, str] | None = None
        self.stop_seconds: float | None = None

    def tree(self) -> dict[int, str]:
        """What it started and must stop: all its descendants with ``detached``, else those
        in its session (it has its own; a run's auto-started separation service has its own
        too, and outlives `dagster dev` on purpose)."""
        return process_tree(self.proc.pid, session=None if self.detached else self.proc.pid)

    def stop(self) -> float:
        if self.stopped_tree is None:
            self.stopped_tree = self.tree()
            self.stop_seconds = stop_and_check(self.proc, self.stopped_tree)
        return self.stop_seconds


def as_background_job() -> None:
    """``preexec_fn``: the signal dispositions of a command started in the background by a
    script or a CI harness under nohup (``nohup cmd &``): HUP, INT and QUIT ignored, TERM
    default."""
    default_signals()
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def serving(argv: list[str], port: int, log_path: Path, *, env: dict | None = None,
            cwd: Path = ROOT, timeout: float = 120, preexec_fn=default_signals,
            detached: bool = False):
    """Run ``argv`` (which serves Dagster's UI on 127.0.0.1:``port``) in its own session,
    with default signal dispositions (or what ``preexec_fn`` sets); yield a ``Server`` once
    /server_info answers; stop it with ``Server.stop`` on the way out (``detached``: the
    processes it started in sessions of their own must stop too)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=env if env is not None else os.environ.copy(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, detached)
    try:
        deadline = time.time() + timeout
        while True:  # polled: nothing tells when the webserver answers but asking it
            try:
                urllib.request.urlopen(f"{server.url}/server_info", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, f"{argv[0]} did not start"
                time.sleep(1)
        yield server
    except BaseException as exc:
        try:
            server.stop()
        except AssertionError as stop_failure:  # the test failed already: say this too
            exc.add_note(str(stop_failure))
        raise
    server.stop()


@contextmanager
def dagster_server(command: list[str], log_path: Path, timeout: float = 120):
    """Run ``command`` (e.g. ``["dagster", "dev"]``) with ``-w workspace.yaml -h 127.0.0.1 -p
    PORT``; yield (process, base URL) once /server_info answers. On the way out: SIGTERM to
    it, and everything it started must be gone within ``STOP_TIMEOUT_S``."""
    port = free_port()
    exe = str(Path(sys.executable).with_name(command[0]))
    with serving([exe, *command[1:], "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                 port, log_path, timeout=timeout) as server:
        yield server.proc, server.url
