#!/usr/bin/env bash
# README command 1: set up, then run Dagster (webserver + daemon with the queue sensor) on
# http://127.0.0.1:3000 against the embedded default instance in dagster_home/ (sqlite) and
# local folders under ./data. Drop a bundle into data/queues/<queue>/ and it is processed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/dagster_home}"
export IMAKER_DATA="${IMAKER_DATA:-$PWD/data}"
.venv/bin/imaker settings >/dev/null   # fail early, with a clear message, on a bad setting
exec .venv/bin/dagster dev -w workspace.yaml -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}"
