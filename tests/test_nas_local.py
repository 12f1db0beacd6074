"""NAS sync to a mounted path (the local backend) between temp folders, plus sync_all and
the ``imaker nas-sync`` service."""

import json
import logging
import signal
import time

import pytest

from imaker.nas import load_config, needs_sync, read_sync_record, sync_all, sync_job
from imaker.nas.cli import main as nas_sync_main
from imaker.fsutil import sha256_file
from test_nas_support import make_job, rewrite_artifact, run_python, sha, tree

CONFIG = """\
nasSync:
  enabled: true
  collision: {policy}
  remoteRoots:
    audio: "{nas}/Instrumentals"
    video: "{nas}/Videos"
  routes:
    - match: {{ kind: "audio", variant: "instrumental" }}
      to: "${{remoteRoots.audio}}/Instrumental"
    - match: {{ kind: "audio", variant: "no_drums" }}
      to: "${{remoteRoots.audio}}/NoDrums"
    - match: {{ kind: "video" }}
      to: "${{remoteRoots.video}}"
      name: "{{artist}}/{{filename}}"
"""


@pytest.fixture
def nas(tmp_path):
    root = tmp_path / "nas"
    (root / "Instrumentals").mkdir(parents=True)
    (root / "Videos").mkdir()
    return root


def config_for(tmp_path, nas, policy="overwrite"):
    path = tmp_path / f"nas_{policy}.yaml"
    path.write_text(CONFIG.format(nas=nas, policy=policy))
    return load_config(path)


def test_routes_by_kind_and_variant_verified_and_recorded(tmp_path, nas):
    job = make_job(tmp_path / "outputs", "job1")
    before = tree(job)
    result = sync_job(job, config_for(tmp_path, nas))
    assert result.status == "ok" and result.count("copied") == 3
    assert tree(nas) == {
        "Instrumentals/Instrumental/AC_DC - Test Song.m4a": b"instrumental " * 1000,
        "Instrumentals/NoDrums/AC_DC - Test Song (no drum).m4a": b"no drums " * 1200,
        "Videos/AC_DC/AC_DC - Test Song.mp4": b"video " * 3000,
    }
    record = read_sync_record(job)
    assert record["status"] == "ok" and record["job_id"] == "job1"
    assert record["manifest_sha256"] == sha256_file(job / "manifest.json")
    by_variant = {(a["kind"], a["variant"]): a for a in record["artifacts"]}
    inst = by_variant[("audio", "instrumental")]
    assert inst["destination"] == f"{nas}/Instrumentals/Instrumental/AC_DC - Test Song.m4a"
    assert inst["status"] == "copied" and inst["bytes"] == inst["bytes_sent"] == 13000
    assert inst["sha256"] == sha(b"instrumental " * 1000) and inst["time"].endswith("Z")
    assert inst["backend"] == "local"
    # outputs untouched apart from sync.json (+ the lock file)
    after = tree(job)
    assert {k: v for k, v in after.items() if k not in ("sync.json", ".sync.lock")} == before
    assert not [p for p in nas.rglob("*") if ".part" in p.name]


def test_rerun_copies_nothing(tmp_path, nas):
    job = make_job(tmp_path / "outputs", "job1")
    config = config_for(tmp_path, nas)
    sync_job(job, config)
    mtimes = {p: p.stat().st_mtime_ns for p in nas.rglob("*") if p.is_file()}
    again = sync_job(job, config)
    assert again.status == "ok" and again.bytes_sent == 0
    assert [a.status for a in again.artifacts] == ["unchanged"] * 3
    assert {p: p.stat().st_mtime_ns for p in nas.rglob("*") if p.is_file()} == mtimes
    # also without sync.json (e.g. another machine synced it): compared by sha256
    (job / "sync.json").unlink()
    third = sync_job(job, config)
    assert third.bytes_sent == 0 and third.count("unchanged") == 3


@pytest.mark.parametrize("policy,status,files", [
    ("overwrite", "replaced", {"AC_DC - Test Song.m4a": b"v2"}),
    ("keep-both", "kept-both", {"AC_DC - Test Song.m4a": b"instrumental " * 1000,
                                "AC_DC - Test Song (2).m4a": b"v2"}),
    ("skip", "skipped", {"AC_DC - Test Song.m4a": b"instrumental " * 1000}),
])
def test_changed_artifact_is_resent_per_collision_policy(tmp_path, nas, policy, status, files):
    job = make_job(tmp_path / "outputs", "job1")
    config = config_for(tmp_path, nas, policy)
    sync_job(job, config)
    rewrite_artifact(job, "audio", "instrumental", b"v2")
    result = sync_job(job, config)
    got = {a.variant + "/" + a.kind: a for a in result.artifacts}
    assert got["instrumental/audio"].status == status
    assert got["no_drums/audio"].status == "unchanged"
    assert tree(nas / "Instrumentals" / "Instrumental") == files
    assert result.status == "ok"
    assert result.bytes_sent == (0 if policy == "skip" else 2)
    # and the next run is a no-op again
    third = sync_job(job, config)
    assert third.bytes_sent == 0
    assert tree(nas / "Instrumentals" / "Instrumental") == files


def test_unrouted_artifact_is_a_warning_not_a_failure(tmp_path, nas, caplog):
    job = make_job(tmp_path / "outputs", "job1", {("audio", "instrumental"): b"a",
                                                   ("stems", "vocals"): b"v"})
    with caplog.at_level(logging.WARNING, logger="imaker.nas"):
        result = sync_job(job, config_for(tmp_path, nas))
    assert result.status == "ok"
    stems = [a for a in result.artifacts if a.kind == "stems"][0]
    assert stems.status == "unrouted" and "no route matches kind=stems variant=vocals" in stems.message
    assert "no route matches kind=stems" in caplog.text


def test_not_configured_is_skipped_with_a_warning(tmp_path, caplog):
    job = make_job(tmp_path / "outputs", "job1")
    with caplog.at_level(logging.WARNING, logger="imaker.nas"):
        result = sync_job(job, None, skip_reason="NAS sync is disabled (NAS_SYNC_ENABLED is false)")
    assert result.status == "skipped" and "NAS_SYNC_ENABLED" in result.reason
    assert "job1: NAS sync is disabled" in caplog.text
    assert not (job / "sync.json").exists()


def test_unmounted_nas_fails_clearly_then_succeeds(tmp_path):
    nas = tmp_path / "nas"  # not there: the share is not mounted
    job = make_job(tmp_path / "outputs", "job1")
    before = tree(job)
    config = config_for(tmp_path, nas)
    result = sync_job(job, config)
    assert result.status == "failed" and result.count("failed") == 3
    msg = result.error_message()
    assert f"destination root {nas}/Instrumentals does not exist" in msg and "NAS mounted" in msg
    assert not nas.exists()  # never created on the local disk in its place
    assert read_sync_record(job)["status"] == "failed"
    assert needs_sync(job, config)
    assert {k: v for k, v in tree(job).items() if k not in ("sync.json", ".sync.lock")} == before
    with pytest.raises(Exception, match="NAS sync of job1 failed for 3 artifact"):
        result.raise_for_status()
    (nas / "Instrumentals").mkdir(parents=True)
    (nas / "Videos").mkdir()
    result = sync_job(job, config)
    assert result.status == "ok" and result.count("copied") == 3
    assert not needs_sync(job, config)


def test_outputs_file_that_differs_from_its_manifest_is_not_sent(tmp_path, nas):
    job = make_job(tmp_path / "outputs", "job1")
    (job / "files/audio/AC_DC - Test Song.m4a").write_bytes(b"corrupted")
    result = sync_job(job, config_for(tmp_path, nas))
    assert result.status == "failed"
    assert "does not match its manifest entry" in result.failures[0].message
    assert not (nas / "Instrumentals/Instrumental/AC_DC - Test Song.m4a").exists()


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import imaker.nas.backends as b
from imaker.nas import load_config, sync_job
b.CHUNK_SIZE = 64 * 1024
real = b._copy_stream
def slow(src, dst, digest):
    total = 0
    while block := src.read(b.CHUNK_SIZE):
        dst.write(block); digest.update(block); total += len(block)
        if hasattr(dst, "flush"): dst.flush()
        print("chunk", flush=True)
        time.sleep(0.05)
    return total
b._copy_stream = slow
sync_job(Path(sys.argv[1]), load_config(sys.argv[2]))
"""


def kill_midway(job, config_path, timeout=20):
    proc = run_python(KILL_SCRIPT.replace("sys.argv[1]", repr(str(job)))
                      .replace("sys.argv[2]", repr(str(config_path))))
    deadline = time.monotonic() + timeout
    chunks = 0
    while chunks < 3 and time.monotonic() < deadline:
        if proc.stdout.readline().startswith(b"chunk"):
            chunks += 1
    assert chunks == 3, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_copy_killed_midway_leaves_no_partial_file_under_its_name(tmp_path, nas):
    big = bytes(range(256)) * 4096 * 4  # 4 MiB -> 64 slow chunks
    job = make_job(tmp_path / "outputs", "job1", {("audio", "instrumental"): big})
    config_path = tmp_path / "nas.yaml"
    config_path.write_text(CONFIG.format(nas=nas, policy="overwrite"))
    kill_midway(job, config_path)
    dest = nas / "Instrumentals" / "Instrumental"
    assert not (dest / "AC_DC - Test Song.m4a").exists()
    leftovers = [p.name for p in dest.iterdir()]
    assert all(n.startswith(".AC_DC - Test Song.m4a.imaker-") and n.endswith(".part")
               for n in leftovers)
    # the next run completes it and sweeps the leftover
    result = sync_job(job, load_config(config_path))
    assert result.status == "ok"
    assert [p.name for p in dest.iterdir()] == ["AC_DC - Test Song.m4a"]
    assert (dest / "AC_DC - Test Song.m4a").read_bytes() == big

    # an update killed midway keeps the old version intact under the final name
    rewrite_artifact(job, "audio", "instrumental", big[::-1])
    kill_midway(job, config_path)
    assert (dest / "AC_DC - Test Song.m4a").read_bytes() == big
    assert sync_job(job, load_config(config_path)).count("replaced") == 1
    assert (dest / "AC_DC - Test Song.m4a").read_bytes() == big[::-1]


def test_sync_all_picks_jobs_not_synced_or_out_of_date(tmp_path, nas):
    outputs = tmp_path / "outputs"
    make_job(outputs, "a")
    make_job(outputs, "b", artist="Other")
    (outputs / "not_a_job").mkdir()
    config = config_for(tmp_path, nas)
    first = sync_all(outputs, config)
    assert sorted(r.job_id for r in first) == ["a", "b"] and all(r.status == "ok" for r in first)
    assert sync_all(outputs, config) == []  # everything is up to date
    rewrite_artifact(outputs / "a", "audio", "no_drums", b"new")
    again = sync_all(outputs, config)
    assert [r.job_id for r in again] == ["a"] and again[0].count("replaced") == 1
    # a changed route makes every job pending again
    other = config_for(tmp_path, nas, "keep-both")
    assert sorted(r.job_id for r in sync_all(outputs, other)) == ["a", "b"]


def test_cli_once(tmp_path, nas, monkeypatch, capsys):
    outputs = tmp_path / "outputs"
    make_job(outputs, "cli1")
    cfg = tmp_path / "nas.yaml"
    cfg.write_text(CONFIG.format(nas=nas, policy="overwrite"))
    monkeypatch.setenv("IMAKER_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("OUTPUTS_DIR", str(outputs))
    monkeypatch.setenv("NAS_SYNC_CONFIG_PATH", str(cfg))
    monkeypatch.setenv("NAS_SYNC_ENABLED", "false")
    assert nas_sync_main(["--once"]) == 0
    assert "warning: NAS sync is disabled" in capsys.readouterr().out
    assert not (nas / "Instrumentals" / "Instrumental").exists()

    monkeypatch.setenv("NAS_SYNC_ENABLED", "true")
    assert nas_sync_main(["--once"]) == 0
    out = capsys.readouterr().out
    assert "cli1: ok: 3 copied" in out
    assert nas_sync_main(["--once"]) == 0
    assert "all jobs in" in capsys.readouterr().out

    cfg.write_text("nasSync:\n  routes:\n    - match: {kind: audio}\n")
    assert nas_sync_main(["--once"]) == 2
    assert "routes[0].to" in capsys.readouterr().err

    cfg.write_text(CONFIG.format(nas=tmp_path / "gone", policy="overwrite"))
    assert nas_sync_main(["--once"]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_cli_watch_syncs_new_jobs_and_stops_on_sigterm(tmp_path, nas):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    cfg = tmp_path / "nas.yaml"
    cfg.write_text(CONFIG.format(nas=nas, policy="overwrite"))
    proc = run_python("import sys; from imaker.nas.cli import main; "
                      f"sys.exit(main(['--watch', '--interval', '0.2', '--config', {str(cfg)!r}, "
                      f"'--outputs', {str(outputs)!r}]))")
    try:
        assert b"watching" in proc.stdout.readline()
        make_job(outputs, "w1")
        line = proc.stdout.readline()
        assert b"w1: ok: 3 copied" in line, line + proc.stderr.read()
        assert (nas / "Instrumentals/Instrumental/AC_DC - Test Song.m4a").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_destination_error_is_reported_per_artifact_and_outputs_stay(tmp_path, nas):
    job = make_job(tmp_path / "outputs", "job1")
    before = tree(job)
    (nas / "Instrumentals" / "Instrumental").write_text("a file where a folder should be")
    result = sync_job(job, config_for(tmp_path, nas))
    assert result.status == "failed"
    by_variant = {a.variant + "/" + a.kind: a for a in result.artifacts}
    assert by_variant["instrumental/audio"].status == "failed"
    assert "Instrumentals/Instrumental" in by_variant["instrumental/audio"].message
    assert by_variant["no_drums/audio"].status == "copied"  # the others still go through
    assert by_variant["instrumental/video"].status == "copied"
    assert {k: v for k, v in tree(job).items() if k not in ("sync.json", ".sync.lock")} == before
