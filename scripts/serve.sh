#!/usr/bin/env bash
# What README command 1 runs once set up (scripts/run.sh): `dagster dev` and the media
# server on this checkout, with the settings from .env (or the environment), the default
# model fetched if missing. Ctrl-C (or SIGTERM) stops both.
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
    echo "serve.sh: no weights for the model yet (offline?). Fetch them later with" \
         "'imaker models fetch', or for a trial: .venv/bin/imaker dev-model data/models" \
         "and DEMUCS_MODEL=tiny_htdemucs in .env (see README, Offline machines)" >&2
fi
# Background commands of a script ignore SIGINT/SIGTERM unless the trap is reset; each
# child is stopped by the trap below (and by Ctrl-C, which reaches the whole group).
(trap - INT TERM; exec "$imaker" media serve) &
media_pid=$!
(trap - INT TERM; exec .venv/bin/dagster dev -w workspace.yaml -h "${DAGSTER_HOST:-127.0.0.1}" \
    -p "${DAGSTER_PORT:-3000}") &
dagster_pid=$!
trap 'kill -TERM "$dagster_pid" "$media_pid" 2>/dev/null || true' INT TERM
trap 'kill -TERM "$media_pid" 2>/dev/null || true' EXIT
set +e
wait "$dagster_pid"
rc=$?
while kill -0 "$dagster_pid" 2>/dev/null; do   # a signal interrupted wait: let dagster finish
    wait "$dagster_pid"
    rc=$?
done
kill -TERM "$media_pid" 2>/dev/null
wait "$media_pid" 2>/dev/null
exit "$rc"
