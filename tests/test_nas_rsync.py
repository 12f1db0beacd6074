"""The rsync backend with the real rsync binary: to a local path, to a real rsync daemon on
127.0.0.1, and over ssh (``host:path``) to a real sshd."""

import signal
import subprocess
import time

import pytest

from imaker.nas import parse_config, sync_job
from test_nas_support import (RSYNC, make_job, make_rsync_daemon, rewrite_artifact, rsyncd,  # noqa: F401
                              sshd, tree, wait_port, free_port)

pytestmark = pytest.mark.skipif(RSYNC is None, reason="rsync is not installed")


def config(to, *, root=None, backend=None, options=None, policy="overwrite"):
    route = {"match": {"kind": "audio"}, "to": "${remoteRoots.nas}" + to if root else to}
    if backend:
        route["backend"] = backend
    data = {"nasSync": {"collision": policy, "routes": [route],
                        "remoteRoots": {"nas": root} if root else {},
                        "backends": {"rsync": options or {}}}}
    return parse_config(data, source="test.yaml")


def test_rsync_to_a_local_path_is_idempotent_and_resends_changes(tmp_path):
    nas = tmp_path / "nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "r1")
    cfg = config("/Instrumentals", root=str(nas), backend="rsync")
    result = sync_job(job, cfg)
    assert result.status == "ok", result.error_message()
    assert [a.status for a in result.artifacts if a.kind == "audio"] == ["copied", "copied"]
    assert [a.status for a in result.artifacts if a.kind == "video"] == ["unrouted"]
    assert tree(nas) == {"Instrumentals/AC_DC - Test Song.m4a": b"instrumental " * 1000,
                         "Instrumentals/AC_DC - Test Song (no drum).m4a": b"no drums " * 1200}
    assert result.artifacts[0].backend == "rsync"
    again = sync_job(job, cfg)
    assert again.bytes_sent == 0 and again.count("unchanged") == 2
    (job / "sync.json").unlink()  # without the record rsync's --checksum still sends nothing
    assert sync_job(job, cfg).bytes_sent == 0
    rewrite_artifact(job, "audio", "no_drums", b"changed!")
    changed = sync_job(job, cfg)
    assert changed.count("replaced") == 1 and changed.bytes_sent > 0
    assert (nas / "Instrumentals/AC_DC - Test Song (no drum).m4a").read_bytes() == b"changed!"


def test_rsync_daemon_copy_rerun_and_keep_both(tmp_path, rsyncd):
    job = make_job(tmp_path / "outputs", "d1")
    cfg = config("/music", root=rsyncd.url("share"), policy="keep-both")
    (rsyncd.module_root / "share").mkdir(exist_ok=True)
    result = sync_job(job, cfg)
    assert result.status == "ok", result.error_message()
    art = result.artifacts[0]
    assert art.destination == f"rsync://127.0.0.1:{rsyncd.port}/nas/share/music/AC_DC - Test Song.m4a"
    assert (rsyncd.module_root / "share/music/AC_DC - Test Song.m4a").read_bytes() == \
        b"instrumental " * 1000
    assert sync_job(job, cfg).bytes_sent == 0
    rewrite_artifact(job, "audio", "instrumental", b"second take")
    kept = sync_job(job, cfg)
    assert kept.artifacts[0].status == "kept-both"
    assert (rsyncd.module_root / "share/music/AC_DC - Test Song (2).m4a").read_bytes() == b"second take"
    assert (rsyncd.module_root / "share/music/AC_DC - Test Song.m4a").read_bytes() == \
        b"instrumental " * 1000
    assert sync_job(job, cfg).bytes_sent == 0


def test_rsync_daemon_unreachable_then_back(tmp_path):
    daemon = make_rsync_daemon(tmp_path / "late")
    (daemon.module_root / "share").mkdir()
    job = make_job(tmp_path / "outputs", "u1")
    cfg = config("/music", root=daemon.url("share"), options={"timeout": 5})
    result = sync_job(job, cfg)
    assert result.status == "failed"
    msg = result.failures[0].message
    assert msg.startswith(f"rsync to rsync://127.0.0.1:{daemon.port}/nas/share/music failed")
    assert "Connection refused" in msg
    daemon.start()
    try:
        result = sync_job(job, cfg)
        assert result.status == "ok" and result.count("copied") == 2
    finally:
        daemon.stop()


def test_missing_module_root_is_a_clear_failure(tmp_path, rsyncd):
    job = make_job(tmp_path / "outputs", "m1")
    result = sync_job(job, config("/music", root=rsyncd.url("no_such_share")))
    assert result.status == "failed"
    assert "destination root" in result.failures[0].message
    assert not (rsyncd.module_root / "no_such_share").exists()


def test_rsync_killed_midway_leaves_nothing_under_the_final_name(tmp_path, rsyncd):
    big = bytes(range(256)) * 4096 * 3  # 3 MiB at 512 KiB/s
    job = make_job(tmp_path / "outputs", "k1", {("audio", "instrumental"): big})
    (rsyncd.module_root / "kill").mkdir()
    dest = rsyncd.module_root / "kill"
    # the same arguments the backend uses, with a bandwidth limit so it can be interrupted
    from imaker.nas.backends import RsyncBackend
    from imaker.nas.config import parse_destination

    backend = RsyncBackend(parse_destination(rsyncd.url("kill")), {"bwlimit": 512})
    args, env = backend._base()
    proc = subprocess.Popen(args + [str(job / "files/audio/AC_DC - Test Song.m4a"),
                                    backend._target("AC_DC - Test Song.m4a")], env=env)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(dest.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the transfer finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(0.5)  # the daemon notices the dropped connection
    assert not (dest / "AC_DC - Test Song.m4a").exists()
    assert all(p.name.startswith(".") for p in dest.iterdir())  # rsync's hidden temp, if any
    result = sync_job(job, config("", root=rsyncd.url("kill")))
    assert result.status == "ok"
    assert (dest / "AC_DC - Test Song.m4a").read_bytes() == big


def test_rsync_over_ssh_host_path(tmp_path, sshd):
    nas = tmp_path / "ssh_nas"
    nas.mkdir()
    job = make_job(tmp_path / "outputs", "s1")
    opts = {"port": sshd.port, "ssh_key_file": str(sshd.key_file),
            "known_hosts": str(sshd.known_hosts), "user": sshd.user, "timeout": 10}
    cfg = config("/Instrumental", root=f"127.0.0.1:{nas}", options=opts)
    result = sync_job(job, cfg)
    assert result.status == "ok", result.error_message()
    assert result.artifacts[0].destination == f"127.0.0.1:{nas}/Instrumental/AC_DC - Test Song.m4a"
    assert tree(nas) == {"Instrumental/AC_DC - Test Song.m4a": b"instrumental " * 1000,
                         "Instrumental/AC_DC - Test Song (no drum).m4a": b"no drums " * 1200}
    assert sync_job(job, cfg).bytes_sent == 0
