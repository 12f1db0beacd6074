#!/usr/bin/env bash
# Sets up everything instrumental-maker needs on a fresh Debian/Ubuntu machine:
# ffmpeg from apt, a Python 3.11 virtualenv in .venv with the pinned stack.
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || need_apt+=(ffmpeg)
for extra in "$@"; do need_apt+=("$extra"); done
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
if ! .venv/bin/python -c "import imaker, dagster, demucs, mutagen" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.imaker-installed ]; then
    .venv/bin/pip install -q "torch==2.13.0" -e ".[test]"
    touch .venv/.imaker-installed
fi
