"""Static checks of the deployment in docker/ (tests/test_compose_e2e.py builds and runs it):
`docker compose config` (with and without the GPU override) when a compose v2 client is
installed (scripts/setup-docker.sh installs one), and in any case the compose YAML itself; both dagster.yaml files through Dagster's
own instance config validation; the run launcher and coordinator built from the compose
instance config; the Dockerfile's rules; the model fetcher's repo layout."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dagster_server import default_signals

ROOT = Path(__file__).parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
SERVICES = {"postgres", "user_code", "separator", "webserver", "daemon", "youtube", "nas-sync",
            "media"}

PG_ENV = {"DAGSTER_POSTGRES_HOST": "postgres", "DAGSTER_POSTGRES_PORT": "5432",
          "DAGSTER_POSTGRES_USER": "dagster", "DAGSTER_POSTGRES_PASSWORD": "secret",
          "DAGSTER_POSTGRES_DB": "dagster", "IMAKER_IMAGE": "instrumental-maker:local"}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=VALUE"
            out[key] = value
    return out


def _settings_env_names() -> set[str]:
    """Every setting's environment variable, from the settings model itself."""
    from imaker.settings import Settings

    names = {name for _, _, name, _ in Settings.variables()}
    assert len(names) > 20, names
    return names


def _readme_env_names() -> set[str]:
    """Every variable in the README's settings table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            first = row.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", first))
    assert len(names) > 20, names
    return names


def _dagster_yaml_config(path: Path, monkeypatch) -> dict:
    """Validate with Dagster's own loader (the one DagsterInstance uses)."""
    from dagster._core.instance.config import dagster_instance_config

    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    # what every launcher exports (imaker.settings.dagster_env); 6 = no default of any host
    monkeypatch.setenv("MAX_CONCURRENT_RUNS", "6")
    config, custom_class = dagster_instance_config(str(path.parent), path.name)
    assert custom_class is None
    return config


# ---------------------------------------------------------------------------------------
# docker compose


def _compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60)
        # compose v2+ (Go) implements the compose specification; Debian's python
        # docker-compose 1.x predates it (no top-level `name`, ...)
        m = re.search(r"version v?(\d+)\.", probe.stdout + probe.stderr, re.I)
        if probe.returncode == 0 and m and int(m.group(1)) >= 2:
            return cmd
    return None


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_docker_compose_config_parses(tmp_path, gpu):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose v2+ client here (docker compose plugin or docker-compose v2; Debian's "
                    "docker-compose 1.x predates the compose spec) "
                    "(the YAML is checked by the other tests)")
    # A copy, so the required docker/.env can be made from .env.example without touching
    # the checkout.
    work = tmp_path / "docker"
    shutil.copytree(DOCKER, work, ignore=shutil.ignore_patterns(".env", "build-extra"))
    env_text = (DOCKER / ".env.example").read_text().replace(
        "DAGSTER_POSTGRES_PASSWORD=\n", "DAGSTER_POSTGRES_PASSWORD=secret\n")
    (work / ".env").write_text(env_text)
    files = ["-f", str(work / "docker-compose.yml")]
    if gpu:
        files += ["-f", str(work / "docker-compose.gpu.yml")]
    proc = subprocess.run([*cli, *files, "--profile", "nas", "config"],
                          capture_output=True, text=True, timeout=120, cwd=work)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    resolved = yaml.safe_load(proc.stdout)
    services = resolved["services"]
    assert SERVICES <= set(services)
    for published in ("webserver", "media"):
        text = yaml.safe_dump(services[published]["ports"])
        assert "127.0.0.1" in text and "0.0.0.0" not in text, published
    # the GPU: reserved for the separator only, and only with the override
    for name, spec in services.items():
        devices = (((spec.get("deploy") or {}).get("resources") or {}).get("reservations")
                   or {}).get("devices")
        if gpu and name == "separator":
            [device] = devices
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
            assert str(device["count"]) == "1"
        else:
            assert not devices, name
    # build args from .env: the base image and the owner of the files
    args = services["user_code"]["build"]["args"]
    assert args["PYTHON_IMAGE"] == "python:3.11.14-slim-bookworm"
    assert args["PUID"] == "1000" and args["PGID"] == "1000"
    assert services["postgres"]["image"] == "postgres:15.14-bookworm"


def test_compose_services_volumes_network_and_profiles():
    c = _compose()
    services = c["services"]
    assert SERVICES <= set(services)
    assert services["nas-sync"]["profiles"] == ["nas"]
    for name in SERVICES - {"nas-sync"}:
        assert "profiles" not in services[name], name
    # base images are pinned by tag (not latest, not a bare name); a variable overrides it
    image = services["postgres"]["image"]
    m = re.fullmatch(r"\$\{POSTGRES_IMAGE:-(.+)\}", image)
    assert m, image
    assert re.fullmatch(r"postgres:\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", m.group(1)), image

    # volumes: named with fixed names (the run launcher mounts the same names)
    volumes = c["volumes"]
    for vol in ("imaker-data", "imaker-outputs", "imaker-library", "imaker-stems",
                "imaker-models", "imaker-postgres", "imaker-dagster-storage"):
        assert volumes[vol]["name"] == vol
    assert c["networks"]["imaker"]["name"] == "imaker"

    def mounts(svc):
        return {v.split(":")[1]: v.split(":")[0] for v in services[svc]["volumes"]}

    for svc in ("user_code", "youtube", "separator"):
        m = mounts(svc)
        # queues, working and archive live on ONE volume: claims are renames
        assert m["/data"] == "imaker-data"
        assert m["/data/outputs"] == "imaker-outputs"
        assert m["/data/stems"] == "imaker-stems"
        assert m["/data/library"] == "imaker-library"
        assert m["/models/custom"] == "imaker-models"
    assert mounts("nas-sync")["/data/outputs"] == "imaker-outputs"
    assert mounts("postgres")["/var/lib/postgresql/data"] == "imaker-postgres"
    for svc in ("daemon", "webserver"):
        m = mounts(svc)
        assert m["/var/run/docker.sock"] == "/var/run/docker.sock"
        assert m["/opt/dagster/dagster_home/dagster.yaml"] == "./dagster.yaml"
        assert m["/opt/dagster/dagster_home/workspace.yaml"] == "./workspace.yaml"
    for svc, spec in services.items():
        assert "imaker" in spec["networks"], svc


def test_compose_gpu_reservation_ports_healthchecks_and_commands():
    services = _compose()["services"]
    # the base file runs on a host without a GPU: no service asks for one
    for name, spec in services.items():
        assert "deploy" not in spec and "runtime" not in spec, name
    # the GPU override: the separator (which alone separates) gets it, nothing else
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu) == {"separator"}
    [device] = gpu["separator"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert str(device["count"]) in ("${IMAKER_GPU_COUNT:-1}", "1", "all")
    sep = services["separator"]
    assert sep["command"][:3] == ["imaker", "separator", "serve"]
    assert sep["command"][sep["command"].index("--port") + 1] == "8765"
    assert "8765/health" in " ".join(sep["healthcheck"]["test"])
    assert _env_example()["SEPARATOR_URL"] == "http://separator:8765"
    # the images' user: PUID/PGID build args
    for svc in ("user_code", "webserver"):
        args = services[svc]["build"]["args"]
        assert args["PUID"] == "${PUID:-1000}" and args["PGID"] == "${PGID:-1000}"
        assert args["PYTHON_IMAGE"].startswith("${PYTHON_IMAGE:-python:3.11.")

    # the UI is published on the loopback address only (by default)
    [port] = services["webserver"]["ports"]
    m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):(\$\{[^}]*\}|\d+):(\d+)", port)
    assert m, port
    assert m.group(1) == "${IMAKER_UI_BIND:-127.0.0.1}" and m.group(3) == "3000"
    # the media server too (listen from the UI), also on loopback by default
    [port] = services["media"]["ports"]
    m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):(\$\{[^}]*\}|\d+):(\d+)", port)
    assert m, port
    assert m.group(1) == "${IMAKER_MEDIA_BIND:-127.0.0.1}" and m.group(3) == "8766"
    media = services["media"]
    assert media["command"][:3] == ["imaker", "media", "serve"]
    assert media["command"][media["command"].index("--port") + 1] == "8766"
    assert "8766/health" in " ".join(media["healthcheck"]["test"])
    # it serves OUTPUTS_DIR and LIBRARY_DIR only, read-only
    assert sorted(media["volumes"]) == ["imaker-library:/data/library:ro",
                                        "imaker-outputs:/data/outputs:ro"]
    env = _env_example()
    assert env["IMAKER_MEDIA_BIND"] == "127.0.0.1"
    assert env["MEDIA_BASE_URL"] == f"http://127.0.0.1:{env['IMAKER_MEDIA_PORT']}"
    for name, spec in services.items():
        if name not in ("webserver", "media"):
            assert "ports" not in spec, f"{name} publishes a port"
        assert "healthcheck" in spec or name == "nas-sync", name

    code = services["user_code"]["command"]
    assert code[:3] == ["dagster", "code-server", "start"]
    assert code[code.index("-m") + 1] == "imaker_assets.definitions"
    assert code[code.index("--location-name") + 1] == "instrumental_maker"
    assert services["user_code"]["environment"]["DAGSTER_CURRENT_IMAGE"] == \
        "${IMAKER_IMAGE:-instrumental-maker:local}"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["nas-sync"]["command"][:3] == ["imaker", "nas-sync", "--watch"]
    assert services["youtube"]["command"] == ["imaker-youtube-watch"]
    # the Postgres password is required, never defaulted
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${DAGSTER_POSTGRES_PASSWORD:?")
    # workspace of webserver/daemon = the code server
    ws = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
    [loc] = ws["load_from"]
    assert loc["grpc_server"] == {"host": "user_code", "port": 4000,
                                  "location_name": "instrumental_maker"}


def test_every_settings_field_is_in_the_readme_the_env_examples_and_the_compose_lists():
    """The README table and .env.example are made from the settings model (imaker settings
    --markdown / --env-example) and must match it; docker/.env.example and the compose
    instance's run env list must name every field."""
    from imaker.settings import Settings, env_example, markdown_table

    fields = [name for _, _, name, _ in Settings.variables()]
    assert len(fields) == len(set(fields)) > 40
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README settings table: run `imaker settings --markdown`"
    assert [row.split("`")[1] for row in markdown_table().splitlines()[2:]] == fields
    assert (ROOT / ".env.example").read_text() == env_example(), \
        ".env.example: run `imaker settings --env-example > .env.example`"
    for name in fields:
        assert f"\n#{name}=" in env_example(), name
        assert name in _env_example(), f"docker/.env.example lacks {name}"
    launcher = yaml.safe_load((DOCKER / "dagster.yaml").read_text())["run_launcher"]["config"]
    missing = set(fields) - set(launcher["env_vars"])
    assert not missing, f"docker/dagster.yaml run_launcher.env_vars lacks {missing}"
    # compose hands every container the whole docker/.env
    assert _compose()["x-env"] == {"env_file": ".env"}


def test_env_example_has_every_setting():
    env = _env_example()
    missing_readme = _readme_env_names() - set(env)
    missing_code = _settings_env_names() - set(env)
    assert not missing_readme, f"README settings missing in docker/.env.example: {missing_readme}"
    assert not missing_code, f"imaker/settings.py settings missing in .env.example: {missing_code}"
    for key in PG_ENV:
        assert key in env
    assert env["DAGSTER_POSTGRES_PASSWORD"] == ""          # the operator must choose one
    assert env["DEMUCS_MODEL_REPO"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    assert env["IMAKER_UI_BIND"] == "127.0.0.1"
    # every value also loads through imaker's own settings parser
    from imaker.settings import load_settings

    settings = load_settings({**env, "DAGSTER_POSTGRES_PASSWORD": "x"})
    assert str(settings.paths.queue_other) == "/data/queues/other"
    assert str(settings.separation.model_repo) == "/models"


# ---------------------------------------------------------------------------------------
# dagster.yaml (compose) and dagster_home/dagster.yaml (local)


def test_local_dagster_yaml_validates(monkeypatch):
    config = _dagster_yaml_config(ROOT / "dagster_home" / "dagster.yaml", monkeypatch)
    assert "storage" not in config and "run_launcher" not in config   # sqlite, default launcher
    _run_limit_from_the_environment(config)
    assert config["run_monitoring"]["enabled"] and config["run_retries"]["enabled"]


def _run_limit_from_the_environment(config: dict) -> None:
    """Runs at once = MAX_CONCURRENT_RUNS (the run coordinator's config: the only place that
    takes an environment variable), no other run limit, and no limit on the `gpu` pool (no
    ingest run ever blocks on a pool: Dagster 1.13's blocked steps spin)."""
    from dagster._core.instance.config import ConcurrencyConfig
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._serdes.config_class import ConfigurableClassData

    rc = config["run_coordinator"]
    assert rc["config"]["max_concurrent_runs"] == {"env": "MAX_CONCURRENT_RUNS"}
    # Dagster refuses a `concurrency` block beside the coordinator's limits
    assert "concurrency" not in config
    coordinator = ConfigurableClassData(rc["module"], rc["class"], yaml.safe_dump(
        rc["config"])).rehydrate(QueuedRunCoordinator)
    effective = ConcurrencyConfig.from_concurrency_settings(
        {}, coordinator.get_run_queue_config())
    assert effective.run_queue_config.max_concurrent_runs == 6     # the variable's value
    assert effective.pool_config.default_pool_limit is None


def test_compose_dagster_yaml_validates_and_builds_its_classes(monkeypatch):
    from dagster._config import validate_config
    from dagster._core.run_coordinator import QueuedRunCoordinator
    from dagster._core.storage.config import pg_config
    from dagster._serdes.config_class import ConfigurableClassData
    from dagster_docker import DockerRunLauncher

    config = _dagster_yaml_config(DOCKER / "dagster.yaml", monkeypatch)

    pg = config["storage"]["postgres"]
    checked = validate_config(pg_config(), pg)
    assert checked.success, checked.errors
    db = pg["postgres_db"]
    for field in ("hostname", "port", "username", "password", "db_name"):
        assert set(db[field]) == {"env"}, f"{field} must come from an env var"
    assert db["scheme"] == "postgresql+psycopg2"     # SQLAlchemy 2.1 defaults to psycopg 3
    from dagster_postgres.utils import pg_url_from_config

    assert pg_url_from_config({"postgres_db": {k: (PG_ENV[v["env"]] if isinstance(v, dict) else v)
                                               for k, v in db.items()}}) == \
        "postgresql+psycopg2://dagster:secret@postgres:5432/dagster"

    # the run launcher: validated against its own schema and instantiated (no engine needed)
    rl = config["run_launcher"]
    assert (rl["module"], rl["class"]) == ("dagster_docker", "DockerRunLauncher")
    launcher = ConfigurableClassData(rl["module"], rl["class"],
                                     yaml.safe_dump(rl["config"])).rehydrate(DockerRunLauncher)
    assert launcher.networks == ["imaker"]
    kwargs = launcher.container_kwargs
    # run containers need no GPU (the separator service has it): CPU hosts run them as is
    assert "device_requests" not in kwargs and "runtime" not in kwargs
    mounts = {v.split(":")[1]: v.split(":")[0] for v in kwargs["volumes"]}
    compose = _compose()
    for path in ("/data", "/data/outputs", "/data/library", "/data/stems", "/models/custom"):
        assert mounts[path] in compose["volumes"], path
        assert compose["volumes"][mounts[path]]["name"] == mounts[path]
    assert mounts["/opt/dagster/storage"] == "imaker-dagster-storage"
    # docker-py accepts these kwargs as they are (HostConfig is built without an engine)
    from docker.models.containers import _create_container_args
    from docker.types import HostConfig

    # what DockerRunLauncher does before containers.create(**kwargs)
    create = {k: v for k, v in kwargs.items() if k not in ("labels", "stop_timeout")}
    args = _create_container_args({"image": "x", "version": "1.44", **create})
    host = args["host_config"]
    assert isinstance(host, HostConfig)
    assert not host.get("DeviceRequests")
    assert len(host["Binds"]) == len(kwargs["volumes"])

    # every imaker setting and the Postgres credentials reach the run containers, and the
    # daemon has them all (docker/.env) so parse_env_var never fails at launch
    env_vars = set(launcher.env_vars)
    assert _settings_env_names() <= env_vars, _settings_env_names() - env_vars
    assert set(PG_ENV) <= env_vars
    assert {"SEPARATOR_URL", "UMASK"} <= env_vars
    assert env_vars <= set(_env_example()), env_vars - set(_env_example())

    # queued coordinator + limits
    rc = config["run_coordinator"]
    coordinator = ConfigurableClassData(rc["module"], rc["class"],
                                        yaml.safe_dump(rc.get("config") or {})).rehydrate(
        QueuedRunCoordinator)
    assert isinstance(coordinator, QueuedRunCoordinator)
    _run_limit_from_the_environment(config)
    limits = {lim["key"]: lim for lim in rc["config"]["tag_concurrency_limits"]}
    # one run per track at a time, keyed as in dagster_home/dagster.yaml: a tag every run of
    # a partition carries, the sensor's and the UI's alike
    assert limits["dagster/partition"]["limit"] == 1
    assert limits["dagster/partition"]["value"] == {"applyLimitPerUniqueValue": True}
    local = yaml.safe_load((ROOT / "dagster_home" / "dagster.yaml").read_text())
    [local_limit] = [lim for lim in local["run_coordinator"]["config"]["tag_concurrency_limits"]
                     if lim["key"] == "dagster/partition"]
    assert local_limit == limits["dagster/partition"]

    # health + retention
    assert config["run_monitoring"]["enabled"] is True
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    assert config["run_retries"]["max_retries"] == 2
    assert config["run_retries"]["retry_on_asset_or_op_failure"] is False
    assert config["run_monitoring"]["start_timeout_seconds"] > 0
    assert config["run_retries"]["enabled"] is True and config["run_retries"]["max_retries"] >= 1
    assert config["retention"]["sensor"]["purge_after_days"]["skipped"] >= 1
    assert config["compute_logs"]["config"]["base_dir"].startswith("/opt/dagster/storage")


def test_compose_instance_loads_as_a_dagster_instance_ref(monkeypatch, tmp_path):
    """The whole file through InstanceRef (what `dagster-daemon run` does first), without
    connecting to Postgres."""
    from dagster._core.instance.ref import InstanceRef

    for key, value in PG_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MAX_CONCURRENT_RUNS", "6")   # as x-dagster-env sets it
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DOCKER / "dagster.yaml", home / "dagster.yaml")
    ref = InstanceRef.from_dir(str(home))
    assert ref.storage_data.module_name == "dagster_postgres"
    assert ref.run_launcher_data.class_name == "DockerRunLauncher"
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"
    assert ref.compute_logs_data.class_name == "LocalComputeLogManager"
    assert ref.settings["run_monitoring"]["enabled"] is True


# ---------------------------------------------------------------------------------------
# images


def _stages(dockerfile: str) -> dict[str, str]:
    stages, current = {}, None
    for line in dockerfile.splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            stages[current] = ""
        elif current:
            stages[current] += line + "\n"
    return stages


def test_dockerfile_rules():
    text = (DOCKER / "Dockerfile").read_text()
    # no `# syntax=` directive: it makes BuildKit pull a frontend image (offline builds)
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    # pinned base image (tag with a patch version; digests are the operator's choice)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    for m in re.finditer(r"^FROM\s+(\S+)", text, re.M):
        ref = m.group(1)
        assert ref.startswith("${PYTHON_IMAGE}") or ref in _stages(text), ref
    stages = _stages(text)
    assert {"app", "dagster", "models"} <= set(stages)
    for final in ("app", "dagster"):
        assert re.search(r"^USER imaker$", stages[final], re.M), f"{final} runs as root"
    app = stages["app"]
    assert "ffmpeg" in app and "--no-install-recommends" in app and "rm -rf /var/lib/apt/lists" in app
    assert "DEMUCS_MODEL_REPO=/models" in app and "HF_HUB_OFFLINE=1" in app
    assert "COPY --from=models /models /models" in app
    assert "python /tmp/models.py fetch --repo /models" in stages["models"]  # = imaker models fetch
    # --build-arg DEMUCS_MODELS= (empty) bakes no weights and runs no download
    assert 'if [ -n "${DEMUCS_MODELS}" ]' in stages["models"]
    # the image user comes from PUID/PGID (linuxserver.io convention)
    assert "ARG PUID=" in text and "ARG PGID=" in text
    assert (DOCKER / "build-extra" / "README.md").is_file()   # bind-mounted by pip steps
    assert '"torch==${TORCH_VERSION}"' in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "dagster-postgres==0.29.27" in text and "DAGSTER_LIBS_VERSION=0.29.27" in text
    # the torch/dependency layers come before the source is copied (code edits stay cheap)
    assert text.index("-r /tmp/build/requirements.txt") < text.index("COPY imaker /src/imaker")
    # the build context leaves out what the image does not need
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in ("**/.venv", "**/.git", "data/", "tests/", "dagster_home/", "**/.env"):
        assert entry in ignore, entry
    # the youtube watcher is a valid shell script
    subprocess.run(["bash", "-n", str(DOCKER / "youtube-watch.sh")], check=True)


def test_youtube_watcher_hands_each_inbox_file_to_imaker_once(tmp_path):
    """docker/youtube-watch.sh with a stand-in `imaker` on PATH: URL files go to
    `imaker retrieve youtube --mode <YTDL_MODE> -- URL...`, then to done/ or failed/;
    .tmp files wait; SIGTERM stops it."""
    import os
    import signal
    import time

    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.txt"
    stub = bindir / "imaker"
    stub.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'for a in "$@"; do [ "$a" = "https://bad" ] && exit 1; done\nexit 0\n')
    stub.chmod(0o755)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.txt").write_text("# my list\nhttps://x/1\n\n  https://x/2  # second\n")
    (inbox / "b.txt").write_text("https://bad\n")
    (inbox / "c.txt.tmp").write_text("https://x/3\n")
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "CALLS": str(calls),
           "IMAKER_INBOX": str(inbox), "IMAKER_INBOX_INTERVAL": "1", "YTDL_MODE": "both"}
    # default signal dispositions, as in its container: a SIGTERM ignored by the test
    # process (see conftest's _stop_signals_as_they_were) would be ignored by the watcher
    proc = subprocess.Popen(["bash", str(DOCKER / "youtube-watch.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_signals)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not (list((inbox / "done").glob("a.txt.*"))
                                               and list((inbox / "failed").glob("b.txt.*"))):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # it did not stop on SIGTERM: the test fails, leaking nothing
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    lines = sorted(calls.read_text().splitlines())
    assert lines == ["retrieve youtube --mode both -- https://bad",
                     "retrieve youtube --mode both -- https://x/1 https://x/2"], out
    assert (inbox / "c.txt.tmp").exists()                    # still being written: untouched
    assert len(list((inbox / "done").glob("a.txt.*.log"))) == 1
    assert "stopped" in out


def test_compose_sets_the_run_limit_with_the_settings_formula():
    """The webserver, daemon and code server start through `x-dagster-env`, which sets
    MAX_CONCURRENT_RUNS as dagster.yaml needs it: as given, or (empty, auto) from `nproc`
    by imaker.settings.default_max_runs' formula (the dagster image has no imaker). nproc
    honours OMP_NUM_THREADS, which stands for hosts of other sizes here."""
    from imaker.settings import default_max_runs

    compose = _compose()
    entry = compose["x-dagster-env"]["entrypoint"]
    for name in ("webserver", "daemon", "user_code"):
        assert compose["services"][name]["entrypoint"] == entry, name
    # `exec` skips the entrypoint: the daemon's liveness check (it opens the instance) runs
    # the same script first
    assert compose["services"]["daemon"]["healthcheck"]["test"] == \
        ["CMD", *entry, "dagster-daemon", "liveness-check"]
    assert entry[:2] == ["sh", "-c"]
    script = entry[2].replace("$$", "$")     # compose's escape of a literal $

    def run(env: dict) -> str:
        out = subprocess.run(["sh", "-c", script, entry[3], "sh", "-c",
                              'echo "$MAX_CONCURRENT_RUNS"'],
                             env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    for cores in (1, 2, 8, 9, 16, 64):
        for value in ("", "auto"):
            assert run({"OMP_NUM_THREADS": str(cores), "MAX_CONCURRENT_RUNS": value}) == \
                str(default_max_runs(cores)), (cores, value)
    assert run({"OMP_NUM_THREADS": "16", "MAX_CONCURRENT_RUNS": "3"}) == "3"
    assert [default_max_runs(c) for c in (1, 2, 8, 16, 64)] == [4, 4, 4, 8, 32]
