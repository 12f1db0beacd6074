#!/usr/bin/env bash
# README command 1: set up, then run Dagster (webserver + daemon with the queue sensor) on
# http://127.0.0.1:3000 against the embedded default instance in dagster_home/ (sqlite) and
# local folders under ./data, and the media server (library page and players, HTTP Range)
# on http://127.0.0.1:8766 (MEDIA_HOST/MEDIA_PORT). Drop a bundle into
# data/queues/<queue>/ and it is processed. Ctrl-C (or SIGTERM) stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/dagster_home}"
export IMAKER_DATA="${IMAKER_DATA:-$PWD/data}"
.venv/bin/imaker settings >/dev/null   # fail early, with a clear message, on a bad setting
# Background commands of a script ignore SIGINT/SIGTERM unless the trap is reset; each
# child is stopped by the trap below (and by Ctrl-C, which reaches the whole group).
(trap - INT TERM; exec .venv/bin/imaker media serve) &
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
