#!/usr/bin/env bash
# README command 2: set up (ffmpeg, .venv) and run the whole test suite, offline, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 DAGSTER_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest "$@"
