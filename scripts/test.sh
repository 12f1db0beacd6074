#!/usr/bin/env bash
# README command 2: set up (ffmpeg, .venv) and run the whole test suite, offline, on the CPU.
# Three pytest workers (pytest-xdist), each test file on one worker: the tests wait on
# subprocesses (dagster, ffmpeg, Docker) much of the time — on 2 cores the pytest tree used
# about 8-9 CPU-minutes in 10-12 wall minutes, so a third worker fills the waits (3 workers:
# 10.4-12.1 min in clean clones on a quiet 2-core machine; 2 workers, every image built
# cold: 11.6 min). PYTEST_WORKERS=0
# runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 DAGSTER_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-3}" --dist loadfile "$@"
