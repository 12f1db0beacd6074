"""Issue acceptance for NAS sync: instrumental, no_drums and video routed to three roots on
three real backends (local folder, SFTP to a real sshd, S3 on moto's server), through
`imaker ingest --once`; a second sync transfers nothing."""

import json

import yaml
from dagster import DagsterInstance, materialize

from conftest import write_bundle
from imaker import cli
from imaker.settings import load_settings
from imaker_assets.nas import nas_copy
from imaker_assets.operations import QUIET
from resources import build_resources
from test_nas_support import s3_client, s3_env, s3_options, s3_server, sshd  # noqa: F401
from test_retrieve_support import make_video


def test_three_routes_on_three_backends_then_nothing_to_send(
        imaker_env, source_m4a, tmp_path, monkeypatch, sshd, s3_server, s3_env):
    local_root, sftp_root = tmp_path / "nas_local", tmp_path / "nas_sftp"
    local_root.mkdir()
    sftp_root.mkdir()
    s3_client(s3_server).create_bucket(Bucket="acceptance")
    config = tmp_path / "nas_sync_config.yaml"
    config.write_text(yaml.safe_dump({"nasSync": {
        "enabled": True,
        "remoteRoots": {"audio": str(local_root),
                        "nodrums": f"sftp://{sshd.user}@127.0.0.1:{sshd.port}{sftp_root}",
                        "video": "s3://acceptance/videos"},
        "backends": {"sftp": {**sshd.options(), "timeout": 5}, "s3": s3_options(s3_server)},
        "routes": [{"match": {"kind": "audio", "variant": "instrumental"},
                    "to": "${remoteRoots.audio}/Instrumental"},
                   {"match": {"kind": "audio", "variant": "no_drums"},
                    "to": "${remoteRoots.nodrums}/NoDrums"},
                   {"match": {"kind": "video"}, "to": "${remoteRoots.video}"}]}}))
    monkeypatch.setenv("NAS_SYNC_ENABLED", "true")
    monkeypatch.setenv("NAS_SYNC_CONFIG_PATH", str(config))
    settings = load_settings()
    folder = write_bundle(settings.paths.queue_youtube_video, "nas_v", source_m4a, video="video.mp4")
    make_video(folder / "video.mp4", 3.0)

    assert cli.main(["ingest", "--once"]) == 0
    out = settings.paths.outputs_dir / "nas_v" / "files"
    assert (local_root / "Instrumental" / "AC_DC - Test Song.m4a").read_bytes() == \
        (out / "audio" / "AC_DC - Test Song.m4a").read_bytes()
    assert (sftp_root / "NoDrums" / "AC_DC - Test Song (no drum).m4a").read_bytes() == \
        (out / "audio" / "AC_DC - Test Song (no drum).m4a").read_bytes()
    s3 = s3_client(s3_server)
    body = s3.get_object(Bucket="acceptance", Key="videos/AC_DC - Test Song.mp4")["Body"].read()
    assert body == (out / "video" / "AC_DC - Test Song.mp4").read_bytes()
    record = json.loads((settings.paths.outputs_dir / "nas_v" / "sync.json").read_text())
    assert record["status"] == "ok"
    assert {a["status"] for a in record["artifacts"]} == {"copied"}
    assert {a["backend"] for a in record["artifacts"]} == {"local", "sftp", "s3"}

    again = materialize([nas_copy], partition_key="nas_v", instance=DagsterInstance.get(),
                        resources=build_resources(settings), run_config=QUIET)
    assert again.success
    record = json.loads((settings.paths.outputs_dir / "nas_v" / "sync.json").read_text())
    assert record["bytes_sent"] == 0
    assert {a["status"] for a in record["artifacts"]} == {"unchanged"}
