"""One settings file: a `.env` read by every entry point, the environment overriding it,
`imaker settings` telling where each value came from, and a bad value as one line.
The end-to-end test is the issue's acceptance: a fresh copy of the checkout, a `.env` that
names a local model repo, README command 1's server processes a dropped bundle with no
exported variables, and `imaker backfill` in a new shell uses the same settings."""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import MODEL_NAME, stop_separator, write_bundle
from dagster_server import free_port, process_tree, stop_and_check

ROOT = Path(__file__).parents[1]
IMAKER = str(Path(sys.executable).with_name("imaker"))


def _clean_env(**extra):
    """A new shell: no imaker or Dagster variable exported."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, **extra}


def test_settings_come_from_dotenv_with_the_environment_overriding(tmp_path):
    (tmp_path / ".env").write_text(
        "# my settings\nIMAKER_DATA=library_data\nDEMUCS_SHIFTS=2\n"
        "OUTPUT_AUDIO_FORMAT='flac'\nQUEUE_OTHER=/srv/queue other\n")
    proc = subprocess.run([IMAKER, "settings"], cwd=tmp_path, capture_output=True, text=True,
                          env=_clean_env(DEMUCS_SHIFTS="3"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split(" = ")[0].strip(): line.split(" = ", 1)[1]
            for line in proc.stdout.splitlines() if " = " in line}
    env_file = str(tmp_path / ".env")
    assert proc.stdout.startswith(f"# settings file: {env_file} ")
    # a relative path in the file is relative to the file
    assert rows["IMAKER_DATA"] == f"{tmp_path / 'library_data'}  # {env_file}"
    assert rows["OUTPUT_AUDIO_FORMAT"] == f"flac  # {env_file}"
    assert rows["QUEUE_OTHER"] == f"/srv/queue other  # {env_file}"
    assert rows["DEMUCS_SHIFTS"] == "3  # environment"
    assert rows["MAX_CLAIM_ATTEMPTS"] == "3  # default"
    assert rows["DEMUCS_MODEL_REPO"] == f"{tmp_path / 'library_data' / 'models'}  # default"


def test_the_run_limit_is_exported_as_a_number_for_dagster_yaml(tmp_path):
    """MAX_CONCURRENT_RUNS: dagster.yaml's run coordinator reads it from the environment and
    needs a number, so `imaker` (and what it starts) and `settings --export` (README command
    1's scripts/serve.sh) hand on the effective one: auto = max(4, cores // 2) of this host,
    a value set in .env or the environment as it is."""
    from imaker.settings import default_max_runs, host_cores

    auto = str(default_max_runs(host_cores()))

    def export(env: dict) -> str:
        proc = subprocess.run([IMAKER, "settings", "--export", "MAX_CONCURRENT_RUNS"],
                              cwd=tmp_path, capture_output=True, text=True,
                              env=_clean_env(**env), timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert export({}) == f"export MAX_CONCURRENT_RUNS={auto}"
    assert export({"MAX_CONCURRENT_RUNS": "auto"}) == f"export MAX_CONCURRENT_RUNS={auto}"
    assert export({"MAX_CONCURRENT_RUNS": "7"}) == "export MAX_CONCURRENT_RUNS=7"
    (tmp_path / ".env").write_text("MAX_CONCURRENT_RUNS=5\n")
    assert export({}) == "export MAX_CONCURRENT_RUNS=5"
    (tmp_path / ".env").unlink()
    proc = subprocess.run([IMAKER, "settings"], cwd=tmp_path, capture_output=True, text=True,
                          env=_clean_env(), timeout=120)
    rows = {line.split(" = ")[0].strip(): line.split(" = ", 1)[1]
            for line in proc.stdout.splitlines() if " = " in line}
    assert rows["MAX_CONCURRENT_RUNS"] == f"{auto}  # default"    # derived, not "environment"
    # the same number reaches a process `imaker` starts (e.g. the daemon of `imaker ingest`)
    from imaker.settings import export_dagster_env, load_settings

    environ = {"MAX_CONCURRENT_RUNS": "auto"}
    assert export_dagster_env(load_settings(environ), environ) == {"MAX_CONCURRENT_RUNS": auto}
    assert environ["MAX_CONCURRENT_RUNS"] == auto
    assert [default_max_runs(c) for c in (1, 2, 4, 8, 9, 16, 32, 64)] == \
        [4, 4, 4, 4, 4, 8, 16, 32]


def test_a_bad_value_in_dotenv_is_one_line_naming_the_file(tmp_path):
    (tmp_path / ".env").write_text("DEMUCS_SHIFTS=lots\n")
    for command in (["settings"], ["backfill"], ["ingest", "--once"], ["models", "list"]):
        proc = subprocess.run([IMAKER, *command], cwd=tmp_path, capture_output=True, text=True,
                              env=_clean_env(), timeout=120)
        assert proc.returncode == 2, command
        assert proc.stderr == (f"imaker: DEMUCS_SHIFTS='lots' is not an integer "
                               f"(set in {tmp_path / '.env'})\n"), command


def _copy_checkout(dest: Path) -> None:
    """The checkout's files as a fresh clone has them (tracked and new, not ignored); the
    virtualenv is linked, not re-installed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(ROOT / ".venv")


def test_a_fresh_checkout_runs_from_dotenv_alone(tmp_path, model_repo, source_m4a):
    clone = tmp_path / "instrumental-maker"
    _copy_checkout(clone)
    port, separator_port, media_port = free_port(), free_port(), free_port()
    (clone / ".env").write_text(
        f"DAGSTER_PORT={port}\nMEDIA_PORT={media_port}\nDEMUCS_MODEL={MODEL_NAME}\nDEMUCS_MODEL_REPO={model_repo}\n"
        f"DEMUCS_DEVICE=cpu\nSEPARATOR_PORT={separator_port}\nGENERATE_NO_DRUMS_VARIANT=false\n")
    data = clone / "data"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=clone, env=_clean_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        write_bundle(data / "queues" / "other", "dotenv_1", source_m4a)
        manifest = data / "outputs" / "dotenv_1" / "manifest.json"
        deadline = time.time() + 300
        while not manifest.exists():
            failed = data / "archive" / "failed" / "job_dotenv_1" / "error.json"
            assert not failed.exists(), failed.read_text()
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        assert (data / "archive" / "done" / "job_dotenv_1").is_dir()
        assert (clone / "dagster_home" / "storage").is_dir()  # the checkout's instance
        # the media server README command 1 starts serves this checkout's outputs
        rel = "dotenv_1/files/audio/AC_DC%20-%20Test%20Song.m4a"
        with urllib.request.urlopen(f"http://127.0.0.1:{media_port}/outputs/{rel}",
                                    timeout=10) as resp:
            assert resp.status == 200 and resp.read(4)
    finally:
        # as a supervisor stops it (`dagster dev` runs in a process group of its own)
        stop_and_check(proc, process_tree(proc.pid))
        stop_separator(separator_port)

    # a new shell: `imaker backfill` finds the same data, model and instance from .env
    audio_dir = data / "outputs" / "dotenv_1" / "files" / "audio"
    assert sorted(p.name for p in audio_dir.iterdir()) == ["AC_DC - Test Song.m4a"]
    proc = subprocess.run([str(clone / ".venv" / "bin" / "imaker"), "backfill", "--variants",
                           "drums_only"], cwd=clone, capture_output=True, text=True,
                          env=_clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in audio_dir.iterdir()) == [
        "AC_DC - Test Song (drums only).m4a", "AC_DC - Test Song.m4a"]
    stop_separator(separator_port)
