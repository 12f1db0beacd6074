"""The SFTP backend (paramiko) against a real OpenSSH sshd on 127.0.0.1 with a throwaway
host key and user key."""

import logging
import signal
import time

import pytest

from imaker.nas import parse_config, sync_job
from test_nas_support import (make_job, make_ssh_server, rewrite_artifact, run_python,  # noqa: F401
                              sshd, tree)


def config(sshd, root, sub="/Instrumental", *, policy="overwrite", port=None, **extra):
    opts = {**sshd.options(), "timeout": 5, **extra}
    return parse_config({"nasSync": {
        "collision": policy,
        "remoteRoots": {"audio": f"sftp://{sshd.user}@127.0.0.1:{port or sshd.port}{root}"},
        "backends": {"sftp": opts},
        "routes": [{"match": {"kind": "audio", "variant": "instrumental"},
                    "to": "${remoteRoots.audio}" + sub},
                   {"match": {"kind": "audio"}, "to": "${remoteRoots.audio}/Other",
                    "name": "{artist}/{title} [{variant}].{ext}"}]}}, source="test.yaml")


def test_sftp_copy_verify_rerun_and_change(tmp_path, sshd):
    nas = tmp_path / "nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "f1")
    cfg = config(sshd, str(nas))
    result = sync_job(job, cfg)
    assert result.status == "ok", result.error_message()
    assert tree(nas) == {"Instrumental/AC_DC - Test Song.m4a": b"instrumental " * 1000,
                         "Other/AC_DC/Test Song [no_drums].m4a": b"no drums " * 1200}
    art = result.artifacts[0]
    assert art.destination == \
        f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{nas}/Instrumental/AC_DC - Test Song.m4a"
    assert art.backend == "sftp" and art.bytes_sent == 13000
    again = sync_job(job, cfg)
    assert again.bytes_sent == 0 and again.count("unchanged") == 2
    (job / "sync.json").unlink()  # compared by reading the remote sha256 back
    assert sync_job(job, cfg).bytes_sent == 0
    rewrite_artifact(job, "audio", "instrumental", b"v2")
    changed = sync_job(job, cfg)
    assert changed.count("replaced") == 1 and changed.bytes_sent == 2
    assert (nas / "Instrumental/AC_DC - Test Song.m4a").read_bytes() == b"v2"
    assert not [p for p in nas.rglob("*") if ".part" in p.name]


def test_sftp_keep_both(tmp_path, sshd):
    nas = tmp_path / "nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "f2")
    cfg = config(sshd, str(nas), policy="keep-both")
    sync_job(job, cfg)
    rewrite_artifact(job, "audio", "instrumental", b"v2")
    assert sync_job(job, cfg).artifacts[0].status == "kept-both"
    assert tree(nas / "Instrumental") == {"AC_DC - Test Song.m4a": b"instrumental " * 1000,
                                          "AC_DC - Test Song (2).m4a": b"v2"}


def test_sftp_unreachable_then_back(tmp_path):
    server = make_ssh_server(tmp_path / "late")  # keys and port reserved, not started
    nas = tmp_path / "nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "f3")
    cfg = config(server, str(nas))
    result = sync_job(job, cfg)
    assert result.status == "failed" and result.count("failed") == 2
    msg = result.failures[0].message
    assert msg.startswith(f"cannot connect to sftp://{server.user}@127.0.0.1:{server.port}")
    assert "refused" in msg.lower()
    server.start()
    try:
        result = sync_job(job, cfg)
        assert result.status == "ok" and result.count("copied") == 2
    finally:
        server.stop()


def test_missing_remote_root_and_unknown_host_key_fail_clearly(tmp_path, sshd):
    job = make_job(tmp_path / "outputs", "f4")
    result = sync_job(job, config(sshd, str(tmp_path / "not_mounted")))
    assert result.status == "failed"
    assert f"destination root {tmp_path / 'not_mounted'} does not exist" in result.failures[0].message
    assert not (tmp_path / "not_mounted").exists()

    other = tmp_path / "other_known_hosts"
    other.write_text("")
    nas = tmp_path / "nas"
    nas.mkdir()
    result = sync_job(job, config(sshd, str(nas), known_hosts=str(other)))
    assert result.status == "failed"
    assert "is not in known_hosts" in result.failures[0].message
    assert not any(nas.iterdir())


def test_password_from_env_is_never_logged_or_recorded(tmp_path, sshd, monkeypatch, caplog):
    secret = "pa55-never-in-logs"
    monkeypatch.setenv("NAS_TEST_SFTP_PASSWORD", secret)
    nas = tmp_path / "nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "f5")
    # password auth is off on the test server: authentication fails with a clear message
    opts = {"known_hosts": str(sshd.known_hosts), "password_env": "NAS_TEST_SFTP_PASSWORD"}
    cfg = parse_config({"nasSync": {"routes": [{
        "to": f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{nas}", "options": opts}]}})
    with caplog.at_level(logging.DEBUG):
        result = sync_job(job, cfg)
    assert result.status == "failed"
    assert "authentication failed" in result.failures[0].message
    assert secret not in caplog.text
    assert secret not in (job / "sync.json").read_text()
    monkeypatch.delenv("NAS_TEST_SFTP_PASSWORD")
    result = sync_job(job, cfg)
    assert "environment variable NAS_TEST_SFTP_PASSWORD (named by password_env) is not set" in \
        result.failures[0].message


KILL_SCRIPT = """
import time
from pathlib import Path
import imaker.nas.backends as b
from imaker.nas import parse_config, sync_job
b.CHUNK_SIZE = 32 * 1024
def slow(src, dst, digest):
    total = 0
    while block := src.read(b.CHUNK_SIZE):
        dst.write(block); digest.update(block); total += len(block)
        dst.flush()
        print("chunk", flush=True)
        time.sleep(0.05)
    return total
b._copy_stream = slow
sync_job(Path(JOB), parse_config(CFG))
"""


def test_sftp_copy_killed_midway_leaves_no_partial_file(tmp_path, sshd):
    big = bytes(range(256)) * 4096 * 2
    nas = tmp_path / "nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "f6", {("audio", "instrumental"): big})
    data = {"nasSync": {"backends": {"sftp": sshd.options()}, "routes": [{
        "to": f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{nas}/In"}]}}
    proc = run_python(KILL_SCRIPT.replace("JOB", repr(str(job))).replace("CFG", repr(data)))
    chunks, deadline = 0, time.monotonic() + 20
    while chunks < 3 and time.monotonic() < deadline:
        if proc.stdout.readline().startswith(b"chunk"):
            chunks += 1
    assert chunks == 3, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.3)
    names = [p.name for p in (nas / "In").iterdir()]
    assert "AC_DC - Test Song.m4a" not in names
    assert all(n.startswith(".AC_DC - Test Song.m4a.imaker-") for n in names)
    result = sync_job(job, parse_config(data))
    assert result.status == "ok"
    assert [p.name for p in (nas / "In").iterdir()] == ["AC_DC - Test Song.m4a"]
    assert (nas / "In/AC_DC - Test Song.m4a").read_bytes() == big
