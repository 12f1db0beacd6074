#!/usr/bin/env bash
# What README command 1 runs once set up (scripts/run.sh): `dagster dev` and the media
# server on this checkout, with the settings from .env (or the environment), the default
# model fetched if missing, and this checkout's separation service. Ctrl-C (or SIGTERM)
# stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
imaker=.venv/bin/imaker
"$imaker" settings >/dev/null   # fail early, with one clear line, on a bad setting
# Dagster's own variables may be in .env too (the environment wins)
# and what dagster.yaml reads: MAX_CONCURRENT_RUNS as a number (auto: from the cores)
eval "$("$imaker" settings --export DAGSTER_HOME DAGSTER_HOST DAGSTER_PORT IMAKER_DATA SEPARATOR_URL \
    MAX_CONCURRENT_RUNS)"
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/dagster_home}"
export IMAKER_DATA="${IMAKER_DATA:-$PWD/data}"
# the default model (DEMUCS_MODEL) into DEMUCS_MODEL_REPO on first start; offline, say how
if ! "$imaker" models fetch --if-missing; then
    echo "serve.sh: no weights for the model yet (offline?). Fetch them later with" \
         "'imaker models fetch', or for a trial: .venv/bin/imaker dev-model data/models" \
         "and DEMUCS_MODEL=tiny_htdemucs in .env (see README, Offline machines)" >&2
fi
# Each child starts with the default SIGINT/SIGTERM handling, whatever this script was
# started with. A script started in the background (by a supervisor, a CI harness, nohup,
# `cmd &` in another script) has SIGINT ignored, bash cannot undo that (`trap - INT` does not
# reset a signal ignored at entry), and an ignored SIGINT made `dagster dev` ignore SIGTERM
# too: Dagster points SIGTERM at SIGINT's handler. The traps below stop each child.
#
# The separation service: this checkout's own, started first with the model loaded (its
# /health answers once it is ready; until then the runs wait for it on its start lock) on
# SEPARATOR_PORT, or on the port this checkout's runs use instead while another install's
# service holds that one. Runs find it running and start none of their own (a detached one
# would outlive this script). Not started when SEPARATOR_URL names a service.
separator_pid= media_pid= dagster_pid=
# `dagster dev` runs in a session (and process group) of its own, which the traps stop as a
# whole, as Ctrl-C in a terminal does: its code server waits for the runs in flight before
# it exits, so SIGTERM to `dagster dev` alone left the code server and a running track's
# run worker going (which then auto-started a separation service of its own). A run in
# flight is interrupted, as with Ctrl-C.
# (Before `dagster dev` runs, a stop signal ends the script; the EXIT trap stops the rest.)
stop_dagster() { [ -z "$dagster_pid" ] || kill -TERM -- "-$dagster_pid" 2>/dev/null || true; }
trap 'stop_dagster; kill -TERM $media_pid $separator_pid 2>/dev/null; [ -n "$dagster_pid" ] || exit 143' HUP INT TERM
trap 'stop_dagster; kill -TERM $media_pid $separator_pid 2>/dev/null || true' EXIT
if [ -z "${SEPARATOR_URL:-}" ]; then
    env --default-signal=INT,TERM "$imaker" separator serve --preload &
    separator_pid=$!
fi
env --default-signal=INT,TERM "$imaker" media serve &
media_pid=$!
setsid env --default-signal=INT,TERM .venv/bin/dagster dev -w workspace.yaml \
    -h "${DAGSTER_HOST:-127.0.0.1}" -p "${DAGSTER_PORT:-3000}" &
dagster_pid=$!
set +e
wait "$dagster_pid"
rc=$?
while kill -0 "$dagster_pid" 2>/dev/null; do   # a signal interrupted wait: let dagster finish
    wait "$dagster_pid"
    rc=$?
done
kill -TERM $media_pid $separator_pid 2>/dev/null
wait $media_pid $separator_pid 2>/dev/null
exit "$rc"
