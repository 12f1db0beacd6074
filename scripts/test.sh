#!/usr/bin/env bash
# README command 2: set up (ffmpeg, .venv) and run the whole test suite, offline, on the CPU.
# Two pytest workers (pytest-xdist), each test file on one worker: the tests wait on
# subprocesses (dagster, ffmpeg, Docker) much of the time. PYTEST_WORKERS=0 runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 DAGSTER_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
