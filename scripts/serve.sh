#!/usr/bin/env bash
# What README command 1 runs once set up (scripts/run.sh): `dagster dev` on this checkout
# with the settings from .env (or the environment), the default model fetched if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
imaker=.venv/bin/imaker
"$imaker" settings >/dev/null   # fail early, with one clear line, on a bad setting
# Dagster's own variables may be in .env too (the environment wins)
eval "$("$imaker" settings --export DAGSTER_HOME DAGSTER_HOST DAGSTER_PORT IMAKER_DATA)"
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/dagster_home}"
export IMAKER_DATA="${IMAKER_DATA:-$PWD/data}"
# the default model (DEMUCS_MODEL) into DEMUCS_MODEL_REPO on first start; offline, say how
if ! "$imaker" models fetch --if-missing; then
    echo "run.sh: no weights for the model yet (offline?). Fetch them later with" \
         "'imaker models fetch', or for a trial: .venv/bin/imaker dev-model data/models" \
         "and DEMUCS_MODEL=tiny_htdemucs in .env (see README, Offline machines)" >&2
fi
exec .venv/bin/dagster dev -w workspace.yaml -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}"
