"""The production storage path for real: a PostgreSQL server (Debian's postgresql 15) in a
temp folder on a loopback port, a Dagster instance configured from docker/dagster.yaml
(dagster-postgres, credentials from env vars), the queue sensor and one track
materialized end to end; then the run, the partition and the materializations are read
back from Postgres with SQL.

Skips only when the PostgreSQL server binaries are not installed (`apt-get install
postgresql`); CI installs them."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_bundle

ROOT = Path(__file__).parents[1]
PG_VERSIONS = ("15", "16", "17", "14", "13")
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _pg_bin() -> Path | None:
    env = os.environ.get("IMAKER_PG_BIN")
    candidates = [Path(env)] if env else [Path(f"/usr/lib/postgresql/{v}/bin") for v in PG_VERSIONS]
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file() and (path / "postgres").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl in a private folder; as root the server runs as the `postgres` user
    (PostgreSQL refuses to run as root)."""

    user = "postgres"
    password = "imaker-test-pw"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="imaker-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "server.log"
        self.port = _free_port()
        self.as_user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root and there is no `postgres` user to run the "
                            "server as (apt-get install postgresql creates it)")
            self.as_user = "postgres"
            self.base.chmod(0o700)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.sock.mkdir()
        (self.base / "pw").write_text(self.password + "\n")
        if self.as_user:
            for p in (self.sock, self.base / "pw"):
                os.chown(p, pw.pw_uid, pw.pw_gid)

    def _cmd(self, *args: str) -> list[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        return ["runuser", "-u", self.as_user, "--", *cmd] if self.as_user else cmd

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)
        if proc.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n"
                               f"{proc.stderr}\n{log[-4000:]}")

    def start(self) -> None:
        # local (unix socket in our folder) trusted; TCP on 127.0.0.1 needs the password
        self._run("initdb", "-D", str(self.data), "-U", self.user, "-E", "UTF8",
                  "--locale=C", "--no-sync", "--auth-local=trust",
                  "--auth-host=scram-sha-256", f"--pwfile={self.base / 'pw'}")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                f"-c unix_socket_directories={self.sock} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except Exception:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                password=self.password, dbname=db, connect_timeout=10)


@pytest.fixture(scope="module")
def postgres_server():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/<v>/bin); "
                    "apt-get install postgresql")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_instance(postgres_server, imaker_env, tmp_path, monkeypatch):
    """A fresh database and $DAGSTER_HOME/dagster.yaml = docker/dagster.yaml with the
    storage folders moved into tmp_path; credentials through the same env vars as compose."""
    from dagster import DagsterInstance

    db = f"dagster_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
    conn = postgres_server.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{db}"')
    conn.close()

    for key, value in {"DAGSTER_POSTGRES_HOST": "127.0.0.1",
                       "DAGSTER_POSTGRES_PORT": str(postgres_server.port),
                       "DAGSTER_POSTGRES_USER": postgres_server.user,
                       "DAGSTER_POSTGRES_PASSWORD": postgres_server.password,
                       "DAGSTER_POSTGRES_DB": db,
                       "IMAKER_IMAGE": "instrumental-maker:test"}.items():
        monkeypatch.setenv(key, value)
    config = yaml.safe_load((ROOT / "docker" / "dagster.yaml").read_text())
    storage = tmp_path / "dagster_storage"
    config["local_artifact_storage"]["config"]["base_dir"] = str(storage)
    config["compute_logs"]["config"]["base_dir"] = str(storage / "compute_logs")
    home = Path(os.environ["DAGSTER_HOME"])          # made by imaker_env
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    instance = DagsterInstance.get()
    try:
        yield instance, db
    finally:
        instance.dispose()


def _query(server, db, sql, *params):
    conn = server.connect(db)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def test_sensor_and_track_run_are_stored_in_postgres(postgres_server, pg_instance, source_m4a):
    from dagster import AssetKey, DagsterRunStatus, SensorResult, SkipReason, build_sensor_context
    from dagster_docker import DockerRunLauncher
    from dagster_postgres import (PostgresEventLogStorage, PostgresRunStorage,
                                  PostgresScheduleStorage)

    from imaker.settings import load_settings
    from imaker_assets.definitions import build_defs
    from resources import build_resources
    from sensors import queue_sensor

    instance, db = pg_instance
    # the compose instance config, loaded for real (launcher instantiated, no engine needed)
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert isinstance(instance.run_launcher, DockerRunLauncher)
    assert instance.run_launcher.networks == ["imaker"]
    assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"

    settings = load_settings()
    defs = build_defs(settings)
    write_bundle(settings.paths.queue_youtube_audio, "pg_song_1", source_m4a)

    # --- the sensor tick, and what the daemon does with its partition requests
    ctx = build_sensor_context(instance=instance, definitions=defs,
                               resources=build_resources(settings))
    result = queue_sensor(ctx)
    assert isinstance(result, SensorResult)
    [req] = result.run_requests
    assert req.partition_key == "pg_song_1"
    for add in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    assert instance.get_dynamic_partitions("tracks") == ["pg_song_1"]

    # --- the requested run, end to end (source_audio -> stems -> variants -> manifest ->
    # nas_copy + checks), against the Postgres instance
    tags = {**req.tags, "dagster/sensor_name": "queue_sensor", "dagster/run_key": req.run_key}
    job = defs.resolve_job_def("ingest_track")
    run = job.execute_in_process(partition_key=req.partition_key, instance=instance,
                                 tags=tags, run_config=QUIET, raise_on_error=False)
    assert run.success, [e.message for e in run.all_events if e.is_failure or e.is_step_failure]
    manifest = json.loads((settings.paths.outputs_dir / "pg_song_1" / "manifest.json").read_text())
    assert manifest["job_id"] == "pg_song_1"
    assert (settings.paths.archive_dir / "done" / "job_pg_song_1").is_dir()

    # the sensor now sees nothing new
    again = queue_sensor(build_sensor_context(instance=instance, definitions=defs,
                                              cursor=result.cursor,
                                              resources=build_resources(settings)))
    assert isinstance(again, SkipReason)

    # --- straight from the database
    runs = _query(postgres_server, db,
                  "SELECT run_id, pipeline_name, status, partition FROM runs")
    assert [(r[0], r[1], r[2], r[3]) for r in runs] == [
        (run.run_id, "ingest_track", "SUCCESS", "pg_song_1")]
    tag_rows = dict(_query(postgres_server, db,
                           "SELECT key, value FROM run_tags WHERE run_id = %s", run.run_id))
    assert tag_rows["imaker/job_id"] == "pg_song_1"
    assert tag_rows["dagster/partition"] == "pg_song_1"
    parts = _query(postgres_server, db,
                   "SELECT partitions_def_name, partition FROM dynamic_partitions")
    assert parts == [("tracks", "pg_song_1")]
    mats = _query(postgres_server, db,
                  "SELECT asset_key, partition FROM event_logs "
                  "WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND run_id = %s",
                  run.run_id)
    materialized = {json.loads(k)[0] if k.startswith("[") else k for k, p in mats
                    if p == "pg_song_1"}
    assert {"source_audio", "stems", "variants", "manifest", "nas_copy"} <= materialized, mats
    checks = _query(postgres_server, db,
                    "SELECT asset_key, check_name, execution_status FROM asset_check_executions "
                    "WHERE run_id = %s", run.run_id)
    assert checks and all(status == "SUCCEEDED" for _, _, status in checks), checks

    # --- and through the instance API (what the UI reads)
    stored = instance.get_run_by_id(run.run_id)
    assert stored.status == DagsterRunStatus.SUCCESS
    assert instance.get_materialized_partitions(AssetKey("manifest")) == {"pg_song_1"}
    event = instance.get_latest_materialization_event(AssetKey("stems"))
    assert event.asset_materialization.partition == "pg_song_1"
