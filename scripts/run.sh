#!/usr/bin/env bash
# README command 1: set up, then run Dagster (webserver + daemon with the queue sensor) on
# http://127.0.0.1:3000 against the embedded default instance in dagster_home/ (sqlite) and
# local folders under ./data, and the media server (library page and players, HTTP Range)
# on http://127.0.0.1:8766 (MEDIA_HOST/MEDIA_PORT). Drop a bundle into
# data/queues/<queue>/ and it is processed. Ctrl-C (or SIGTERM) stops all of it (and the
# separation service that scripts/serve.sh starts).
# Settings: a .env file in this folder (see .env.example); the environment overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/serve.sh
