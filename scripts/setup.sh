#!/usr/bin/env bash
# Sets up everything instrumental-maker needs on a fresh Debian/Ubuntu machine:
# ffmpeg from apt, a Python 3.11 virtualenv in .venv with the pinned stack.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# scripts/setup.sh [--test]: --test also installs what the tests run for real (Chromium
# and its driver for the browser test, an sshd for the NAS tests, PostgreSQL for the
# production-storage test, FluidSynth's library for the generated songs).
need_apt=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || need_apt+=(ffmpeg)
command -v rsync >/dev/null 2>&1 || need_apt+=(rsync)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
extras="."
if [ "${1:-}" = "--test" ]; then
    extras=".[test]"
    command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
    [ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)  # a real sshd for the SFTP/rsync tests
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)  # Postgres e2e
    # FluidSynth's library for pyfluidsynth (imaker dev-song: songs with known stems)
    ls /usr/lib/*/libfluidsynth.so.3 >/dev/null 2>&1 || need_apt+=(libfluidsynth3)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "instrumental-maker needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch first and in the same call as demucs: an unpinned resolve pulls a CUDA build.
stamp=".venv/.imaker-installed-$(echo "$extras" | tr -c 'a-z' '_')"
if ! .venv/bin/python -c "import imaker, dagster, demucs, mutagen" >/dev/null 2>&1 \
   || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q "torch==2.13.0" -e "$extras"
    touch "$stamp"
fi
if [ "${1:-}" = "--test" ]; then bash scripts/setup-docker.sh; fi  # Docker engine + compose for tests/test_compose_e2e.py
