#!/usr/bin/env bash
# README command 1: set up, then run Dagster (webserver + daemon with the queue sensor) on
# http://127.0.0.1:3000 against the embedded default instance in dagster_home/ (sqlite) and
# local folders under ./data. Drop a bundle into data/queues/<queue>/ and it is processed.
# Settings: a .env file in this folder (see .env.example); the environment overrides it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/serve.sh
