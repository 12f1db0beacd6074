"""The S3 backend (boto3) against moto's standalone S3 server on 127.0.0.1."""

import logging

import pytest

from imaker.nas import parse_config, sync_job
from test_nas_support import (S3_ENV, free_port, make_job, rewrite_artifact, s3_client,  # noqa: F401
                              s3_env, s3_options, s3_server, sha, start_moto)


def config(port, bucket="media", prefix="instrumentals", policy="overwrite"):
    return parse_config({"nasSync": {
        "collision": policy,
        "remoteRoots": {"audio": f"s3://{bucket}/{prefix}"},
        "backends": {"s3": s3_options(port)},
        "routes": [{"match": {"kind": "audio", "variant": "instrumental"},
                    "to": "${remoteRoots.audio}/Instrumental"},
                   {"match": {"kind": "audio"}, "to": "${remoteRoots.audio}/Other"},
                   {"match": {"kind": "video"}, "to": f"s3://{bucket}/videos",
                    "name": "{job_id}/{filename}"}]}}, source="test.yaml")


def objects(port, bucket):
    s3 = s3_client(port)
    out = {}
    for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        out[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def test_s3_copy_verify_rerun_and_change(tmp_path, s3_server, s3_env, caplog):
    s3_client(s3_server).create_bucket(Bucket="media")
    job = make_job(tmp_path / "outputs", "s3a")
    cfg = config(s3_server)
    with caplog.at_level(logging.DEBUG):
        result = sync_job(job, cfg)
    assert result.status == "ok", result.error_message()
    assert objects(s3_server, "media") == {
        "instrumentals/Instrumental/AC_DC - Test Song.m4a": b"instrumental " * 1000,
        "instrumentals/Other/AC_DC - Test Song (no drum).m4a": b"no drums " * 1200,
        "videos/s3a/AC_DC - Test Song.mp4": b"video " * 3000}
    head = s3_client(s3_server).head_object(
        Bucket="media", Key="instrumentals/Instrumental/AC_DC - Test Song.m4a")
    assert head["Metadata"]["sha256"] == sha(b"instrumental " * 1000)
    assert result.artifacts[0].destination == \
        "s3://media/instrumentals/Instrumental/AC_DC - Test Song.m4a"
    again = sync_job(job, cfg)
    assert again.bytes_sent == 0 and again.count("unchanged") == 3
    (job / "sync.json").unlink()
    assert sync_job(job, cfg).bytes_sent == 0
    rewrite_artifact(job, "audio", "no_drums", b"v2")
    changed = sync_job(job, cfg)
    assert changed.count("replaced") == 1 and changed.bytes_sent == 2
    assert objects(s3_server, "media")["instrumentals/Other/AC_DC - Test Song (no drum).m4a"] == b"v2"
    # the credentials never show up
    assert S3_ENV["NAS_TEST_S3_SECRET"] not in caplog.text
    assert S3_ENV["NAS_TEST_S3_SECRET"] not in (job / "sync.json").read_text()


def test_s3_keep_both_and_skip(tmp_path, s3_server, s3_env):
    s3_client(s3_server).create_bucket(Bucket="keepboth")
    job = make_job(tmp_path / "outputs", "s3b", {("audio", "instrumental"): b"one"})
    sync_job(job, config(s3_server, "keepboth", policy="keep-both"))
    rewrite_artifact(job, "audio", "instrumental", b"two")
    assert sync_job(job, config(s3_server, "keepboth", policy="skip")).artifacts[0].status == "skipped"
    res = sync_job(job, config(s3_server, "keepboth", policy="keep-both"))
    assert res.artifacts[0].status == "kept-both"
    assert objects(s3_server, "keepboth") == {
        "instrumentals/Instrumental/AC_DC - Test Song.m4a": b"one",
        "instrumentals/Instrumental/AC_DC - Test Song (2).m4a": b"two"}


def test_s3_missing_bucket_and_unreachable_endpoint_then_back(tmp_path, s3_server, s3_env):
    job = make_job(tmp_path / "outputs", "s3c")
    result = sync_job(job, config(s3_server, "nope"))
    assert result.status == "failed"
    assert result.failures[0].message == \
        f"S3 bucket nope does not exist at http://127.0.0.1:{s3_server}"

    port = free_port()
    cfg = config(port, "later")
    result = sync_job(job, cfg)
    assert result.status == "failed" and result.count("failed") == 3
    assert result.failures[0].message.startswith(
        f"cannot reach S3 endpoint http://127.0.0.1:{port} for s3://later/")
    server = start_moto(port)
    try:
        s3_client(port).create_bucket(Bucket="later")
        result = sync_job(job, cfg)
        assert result.status == "ok" and result.count("copied") == 3
    finally:
        server.stop()


def test_s3_missing_credentials_env_is_clear(tmp_path, s3_server, s3_env, monkeypatch):
    monkeypatch.delenv("NAS_TEST_S3_SECRET")
    job = make_job(tmp_path / "outputs", "s3d")
    result = sync_job(job, config(s3_server))
    assert "environment variable NAS_TEST_S3_SECRET (named by secret_access_key_env) is not set" \
        in result.failures[0].message
