"""Shared fixtures: a tiny demucs model repo, generated audio, a temp data root and a
temp Dagster instance. Everything is real (ffmpeg, demucs loading code, Dagster)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

# a developer's own .env never leaks into the tests (tests/test_settings_file.py sets its own)
os.environ["IMAKER_ENV_FILE"] = ""
# Two pytest workers share 2 cores with each other's subprocesses (dagster, the separation
# service, ffmpeg): torch's OpenMP threads must sleep, not spin, while they wait for work
# (set before torch is imported; inherited by the subprocesses). Measured: the in-process
# torch tests ran 3-5x slower beside a busy worker; the suite without the compose test went
# from 8:15 to 6:56.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dagster_server import STOP_SIGNALS
from imaker.devmodel import build_model_repo

MODEL_NAME = "tiny_htdemucs"


def pytest_configure(config):
    """The test session's own auto-started separation service: a free port chosen once (by
    the xdist controller, before it starts the workers, which share it, as a deployment's
    runs share one), stopped when the session ends. Without it the tests shared the default
    port's service with earlier test runs (it lives 15 idle minutes): code edited since
    was not the code that separated. The workers share one tiny model repo too: a service
    serves one model repo (its identity), so a repo per worker would be a service per worker."""
    if hasattr(config, "workerinput") or os.environ.get("IMAKER_TEST_SEPARATOR_PORT"):
        return
    from dagster_server import free_port

    os.environ["IMAKER_TEST_SEPARATOR_PORT"] = str(free_port())
    config._imaker_separator_port = int(os.environ["IMAKER_TEST_SEPARATOR_PORT"])
    os.environ["IMAKER_TEST_MODEL_REPO"] = tempfile.mkdtemp(prefix="imaker-test-models-")
    config._imaker_model_repo = os.environ["IMAKER_TEST_MODEL_REPO"]


def stop_separator(port: int) -> None:
    """Stop the auto-started separation service on ``port`` (SIGTERM to the pid its /health
    names), if one answers, and those this checkout started instead of it while another
    one held the port (their ports are recorded beside the client's start lock)."""
    from imaker.separator.client import SeparatorClient

    ports = [port]
    for state in Path(tempfile.gettempdir()).glob(f"imaker-separator-{port}-*.json"):
        try:
            ports.append(int(json.loads(state.read_text())["port"]))
            state.unlink()
        except (OSError, ValueError, KeyError):
            pass
    for p in ports:
        health = SeparatorClient(url=None, port=p).health()
        if health and health.get("pid"):
            try:
                os.kill(int(health["pid"]), signal.SIGTERM)
            except ProcessLookupError:
                pass


def pytest_unconfigure(config):
    port = getattr(config, "_imaker_separator_port", None)
    if port is not None:
        stop_separator(port)
    if getattr(config, "_imaker_model_repo", None):
        shutil.rmtree(config._imaker_model_repo, ignore_errors=True)
        Path(config._imaker_model_repo + ".lock").unlink(missing_ok=True)


#: how the test process handles the stop signals at its start (before any test ran)
_DISPOSITIONS = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}


@pytest.fixture(autouse=True)
def _stop_signals_as_they_were():
    """Each test leaves HUP/INT/QUIT/TERM as the test process had them. In-process Dagster
    execution (``materialize``, ``execute_in_process``) ends by pointing SIGTERM at SIGINT's
    handler (``dagster._utils.interrupts.setup_interrupt_handlers``); in a worker started
    with SIGINT ignored (pytest in the background: a CI harness, nohup) that left SIGTERM
    ignored for every later test and every process they start — a bash script among them
    cannot trap it (a watcher that never stopped on SIGTERM). The product's own in-process
    calls restore them (``imaker_assets.operations``); the tests call Dagster directly."""
    yield
    for sig, handler in _DISPOSITIONS.items():
        if handler is not None and signal.getsignal(sig) != handler:
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory) -> Path:
    shared = os.environ.get("IMAKER_TEST_MODEL_REPO")
    if not shared:  # a session that did not run this conftest's pytest_configure
        return build_model_repo(tmp_path_factory.mktemp("models"), MODEL_NAME)
    repo = Path(shared)
    with FileLock(str(repo) + ".lock"):  # one worker builds it, the others wait
        if not (repo / f"{MODEL_NAME}.yaml").is_file():
            build_model_repo(repo, MODEL_NAME)
    return repo


def make_audio(path: Path, seconds: float = 3.0, *, freq: int = 440, fmt_args=()) -> Path:
    """A stereo tone plus noise, encoded by ffmpeg according to the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y",
         "-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=44100:duration={seconds}",
         "-f", "lavfi", "-i", f"anoisesrc=color=pink:amplitude=0.2:sample_rate=44100:duration={seconds}",
         "-filter_complex", "[0][1]amix=inputs=2:normalize=0,pan=stereo|c0=c0|c1=0.8*c0",
         *fmt_args, str(path)], check=True)
    return path


#: an "audio file" no demuxer accepts, the same every run (random bytes were sometimes
#: probed as a container without an audio stream, which changed the failure reason)
JUNK_AUDIO = b"this is not an m4a file\n" * 170


def make_cover(path: Path) -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "color=c=red:s=64x64", "-frames:v", "1", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def source_m4a(tmp_path_factory) -> Path:
    return make_audio(tmp_path_factory.mktemp("media") / "audio.m4a", 3.0)


@pytest.fixture(scope="session")
def cover_jpg(tmp_path_factory) -> Path:
    return make_cover(tmp_path_factory.mktemp("cover") / "cover.jpg")


@pytest.fixture
def imaker_env(tmp_path, monkeypatch, model_repo):
    """A private data root + DAGSTER_HOME, and the tiny model on the CPU."""
    return imaker_env_at(monkeypatch, tmp_path, model_repo)


def imaker_env_at(monkeypatch, root: Path, model_repo: Path) -> Path:
    """``imaker_env`` under ``root`` with any MonkeyPatch (a module-scoped one too)."""
    data = root / "data"
    home = root / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).parents[1] / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    for key in ("QUEUE_YOUTUBE_AUDIO", "QUEUE_YOUTUBE_VIDEO", "QUEUE_OTHER", "OUTPUTS_DIR",
                "ARCHIVE_DIR", "WORKING_DIR", "LIBRARY_DIR", "STEMS_DIR",
                "GENERATE_NO_DRUMS_VARIANT", "GENERATE_DRUMS_ONLY_VARIANT", "PRESERVE_STEMS",
                "OUTPUT_AUDIO_FORMAT", "DEMUCS_SEGMENT", "DEMUCS_SHIFTS", "DEMUCS_BATCH_SIZE",
                "DEMUCS_AUTOCAST", "DEMUCS_CPU_AUTOCAST", "NAS_SYNC_ENABLED",
                "NAS_SYNC_CONFIG_PATH", "SEPARATOR_URL", "SEPARATOR_PORT", "SEPARATOR_CONCURRENCY",
                "UMASK", "NOTIFY_URLS", "NOTIFY_ON", "MEDIA_HOST", "MEDIA_PORT",
                "MEDIA_BASE_URL", "DEMUCS_BACKEND"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("IMAKER_DATA", str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DEMUCS_MODEL", MODEL_NAME)
    monkeypatch.setenv("DEMUCS_MODEL_REPO", str(model_repo))
    monkeypatch.setenv("DEMUCS_DEVICE", "cpu")
    # what dagster.yaml reads, as every launcher sets it (imaker.settings.dagster_env)
    from imaker.settings import dagster_env, load_settings

    for name, value in dagster_env(load_settings(dict(os.environ))).items():
        monkeypatch.setenv(name, value)
    # the session's own auto-started service (pytest_configure); several checkouts testing
    # on one machine each get theirs
    if os.environ.get("IMAKER_TEST_SEPARATOR_PORT"):
        monkeypatch.setenv("SEPARATOR_PORT", os.environ["IMAKER_TEST_SEPARATOR_PORT"])
    return data


def write_bundle(queue_dir: Path, job_id: str, media: Path | None, *, folder: str | None = None,
                 cover: Path | None = None, **fields) -> Path:
    """Write a bundle the way a retriever must: job_<id>.tmp/ then rename to job_<id>/."""
    name = folder or f"job_{job_id}"
    tmp = queue_dir / f"{name}.tmp"
    tmp.mkdir(parents=True)
    audio_name = "audio" + (Path(media).suffix if media is not None else ".m4a")
    data = {"schema_version": 1, "job_id": job_id, "source_type": "youtube",
            "title": "Test Song", "artist": "AC/DC", "album": "YTDL", "audio": audio_name}
    if media is not None:
        shutil.copy(media, tmp / audio_name)  # fields below may point "audio" elsewhere
    if cover is not None:
        shutil.copy(cover, tmp / "cover.jpg")
        data["cover"] = "cover.jpg"
    data.update(fields)
    raw = data.pop("_raw", None)
    (tmp / "job.json").write_text(raw if raw is not None else json.dumps(data))
    final = queue_dir / name
    tmp.rename(final)
    return final


def claim_tags(job_id: str) -> dict[str, str]:
    """Claim a queued bundle the way the queue sensor does (a new drop in working/) and
    return the tags of the run that processes it. Materializing with these tags in-process
    runs exactly the steps of a sensor's `ingest_track` run."""
    from imaker.queues import QueueStore
    from imaker.settings import load_settings

    store = QueueStore.from_settings(load_settings())
    job = next((j for j in store.discover() if j.job_id == job_id), None)
    if job is None:
        return {}  # nothing queued: re-materialize from the archived bundle (no drop)
    claim = store.claim(job, by="test")
    return {"imaker/job_id": job_id, "imaker/drop_id": claim.drop_id}
