#!/usr/bin/env bash
# Run where PyPI is reachable: downloads into .whl/ the wheels that benchmarks/gpu.sh
# needs besides torch on an offline GPU machine with Python 3.12 (the device image:
# torch, numpy, pandas, ... are there already). Keep .whl/ out of git
# (`echo /.whl/ >> .git/info/exclude`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "dagster==1.13.27" "dagster-webserver==1.13.27" "demucs==4.1.0" mutagen \
    dora-search julius lameenc openunmix "numpy<2.6"
"$PY" -m pip wheel -q --no-deps -w .whl .
ls .whl | wc -l
