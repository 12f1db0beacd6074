"""Start `dagster dev` / `dagster-webserver` on a free loopback port for a test, and stop it."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dagster_server(command: list[str], log_path: Path, timeout: float = 120):
    """Run ``command`` (e.g. ``["dagster", "dev"]``) with ``-w workspace.yaml -h 127.0.0.1 -p
    PORT`` in its own process group; yield (process, base URL) once /server_info answers."""
    port = free_port()
    exe = str(Path(sys.executable).with_name(command[0]))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [exe, *command[1:], "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                    break
                except OSError:
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    assert time.time() < deadline, f"{command[0]} did not start"
                    time.sleep(1)
            yield proc, f"http://127.0.0.1:{port}"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
