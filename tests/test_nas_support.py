"""Helpers and real loopback peers for the NAS sync tests (no tests in this file).

* ``make_job``: an ``outputs/<job_id>/`` folder with files and a schema-valid manifest;
* ``sshd``: a real OpenSSH server on 127.0.0.1 with a throwaway host key and user key;
* ``rsyncd``: a real rsync daemon on 127.0.0.1;
* ``s3_server``: moto's standalone S3 server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaker.bundle import ArtifactMetadata, JobManifest

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
RSYNC = shutil.which("rsync")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_job(outputs: Path, job_id: str, files: dict[tuple[str, str], bytes] | None = None,
             *, artist: str = "AC/DC", title: str = "Test Song") -> Path:
    """``files``: (kind, variant) -> content. Paths follow the pipeline's names."""
    files = files if files is not None else {
        ("audio", "instrumental"): b"instrumental " * 1000,
        ("audio", "no_drums"): b"no drums " * 1200,
        ("video", "instrumental"): b"video " * 3000,
    }
    out = outputs / job_id
    arts = []
    safe_artist = artist.replace("/", "_")
    for (kind, variant), data in files.items():
        suffix = {"instrumental": "", "no_drums": " (no drum)", "drums_only": " (drums only)"}.get(
            variant, f" ({variant})")
        ext = {"audio": "m4a", "video": "mp4", "stems": "flac"}[kind]
        folder = {"audio": "audio", "video": "video", "stems": "stems"}[kind]
        rel = f"files/{folder}/{safe_artist} - {title}{suffix}.{ext}"
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        arts.append(ArtifactMetadata(kind=kind, variant=variant, label=variant, path=rel,
                                     codec="aac", duration_s=3.0, sample_rate=44100, channels=2,
                                     size_bytes=len(data), sha256=sha(data)))
    JobManifest(job_id=job_id, source_type="local", artist=artist, album="YTDL", title=title,
                stems_preserved=False, artifacts=arts,
                provenance={"source": {"type": "local", "input_sha256": "0" * 64},
                            "separation": {"model": "m", "signature": "s", "device": "cpu"},
                            "software": {}, "created_at": "2026-01-01T00:00:00Z"}).save(out)
    return out


def rewrite_artifact(job_dir: Path, kind: str, variant: str, data: bytes) -> Path:
    """Change one artifact's bytes and its manifest entry (what re-materializing does)."""
    man = JobManifest.load(job_dir)
    for art in man.artifacts:
        if art.kind == kind and art.variant == variant:
            (job_dir / art.path).write_bytes(data)
            art.size_bytes, art.sha256 = len(data), sha(data)
            man.save(job_dir)
            return job_dir / art.path
    raise KeyError((kind, variant))


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ----- sshd ------------------------------------------------------------------------------
@dataclass
class SshServer:
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    workdir: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([SSHD, "-f", str(self.workdir / "sshd_config"), "-D", "-e",
                                      "-o", f"Port={self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def options(self) -> dict:
        return {"key_file": str(self.key_file), "known_hosts": str(self.known_hosts)}


def make_ssh_server(workdir: Path, port: int | None = None) -> SshServer:
    if SSHD is None:
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("the test sshd runs as root")
    workdir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
    host_key, user_key = workdir / "host_key", workdir / "user_key"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "imaker-test",
                        "-f", str(key)], check=True)
    (workdir / "authorized_keys").write_text((workdir / "user_key.pub").read_text())
    (workdir / "authorized_keys").chmod(0o600)
    port = port or free_port()
    (workdir / "sshd_config").write_text("\n".join([
        "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}", "StrictModes no",
        "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "UsePAM no",
        "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
    host_pub = (workdir / "host_key.pub").read_text().split()
    known = workdir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    import pwd

    return SshServer(port, pwd.getpwuid(os.geteuid()).pw_name, user_key, known, workdir)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    server = make_ssh_server(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


# ----- rsync daemon ----------------------------------------------------------------------
@dataclass
class RsyncDaemon:
    port: int
    module_root: Path
    workdir: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [RSYNC, "--daemon", "--no-detach", f"--config={self.workdir / 'rsyncd.conf'}",
             f"--port={self.port}", "--address=127.0.0.1",
             f"--log-file={self.workdir / 'rsyncd.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def url(self, path: str = "") -> str:
        return f"rsync://127.0.0.1:{self.port}/nas/{path}".rstrip("/")


def make_rsync_daemon(workdir: Path, port: int | None = None) -> RsyncDaemon:
    if RSYNC is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")
    workdir.mkdir(parents=True, exist_ok=True)
    root = workdir / "module"
    root.mkdir(exist_ok=True)
    user = "uid = root\ngid = root\n" if os.geteuid() == 0 else ""
    (workdir / "rsyncd.conf").write_text(
        f"pid file = {workdir / 'rsyncd.pid'}\nuse chroot = no\n{user}"
        f"[nas]\npath = {root}\nread only = no\n")
    return RsyncDaemon(port or free_port(), root, workdir)


@pytest.fixture(scope="module")
def rsyncd(tmp_path_factory):
    daemon = make_rsync_daemon(tmp_path_factory.mktemp("rsyncd"))
    daemon.start()
    yield daemon
    daemon.stop()


# ----- S3 (moto) -------------------------------------------------------------------------
S3_ENV = {"NAS_TEST_S3_KEY": "testing-key-id", "NAS_TEST_S3_SECRET": "s3cr3t-never-logged"}


def s3_options(port: int) -> dict:
    return {"endpoint_url": f"http://127.0.0.1:{port}", "region": "us-east-1",
            "access_key_id_env": "NAS_TEST_S3_KEY", "secret_access_key_env": "NAS_TEST_S3_SECRET",
            "timeout": 2, "max_attempts": 1}


def s3_client(port: int):
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id=S3_ENV["NAS_TEST_S3_KEY"],
                        aws_secret_access_key=S3_ENV["NAS_TEST_S3_SECRET"])


def start_moto(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    wait_port(port)
    return server


@pytest.fixture
def s3_env(monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    server = start_moto(port)
    yield port
    server.stop()


def run_python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
