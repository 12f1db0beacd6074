# Sourced by benchmarks/gpu.sh (bash, from the repo root, with PY set): makes our packages
# and ffmpeg/ffprobe usable on an offline machine from the folder .gpu/ that
# benchmarks/gpu_wheels.sh made (or from .whl/, wheels only). Exports PYTHONPATH and PATH,
# and where the image has no FluidSynth (for the generated songs) IMAKER_FLUIDSYNTH_LIB and
# IMAKER_FLUIDSYNTH_PATH (benchmarks/render_songs.py: the library, and the folder of the
# libraries it needs that the image lacks, for its LD_LIBRARY_PATH only).
# Nothing to do where neither folder exists (a host with `pip install -e .` and ffmpeg).
WHEELS=""
for dir in .gpu .whl; do
    if [ -d "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then WHEELS=$dir; break; fi
done
if [ -n "$WHEELS" ]; then
    t0=$(date +%s)
    rm -rf /tmp/imaker-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --ignore-requires-python --target /tmp/imaker-site "$WHEELS"/*.whl
    # the working tree first: our code as checked out, the wheel only brings its metadata
    export PYTHONPATH=$PWD:/tmp/imaker-site${PYTHONPATH:+:$PYTHONPATH}
    # bench_batch.py and `imaker ingest` start `dagster`, `dagster-daemon` and `imaker`
    # beside sys.executable; their shebang is "$PY" (pip wrote it)
    bindir=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
    for exe in dagster dagster-daemon dagster-webserver dagster-graphql imaker demucs; do
        [ -e /tmp/imaker-site/bin/$exe ] || continue
        ln -sf /tmp/imaker-site/bin/$exe "$bindir/$exe" 2>/dev/null \
            || echo "warning: cannot link $exe into $bindir" >&2
    done
    export PATH=$PATH:/tmp/imaker-site/bin
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ in $(( $(date +%s) - t0 )) s"
fi
if [ -f .gpu/ffmpeg-bin.tar.xz ] && ! { command -v ffmpeg && command -v ffprobe; } >/dev/null; then
    rm -rf /tmp/imaker-ffbin && mkdir -p /tmp/imaker-ffbin
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        .gpu/ffmpeg-bin.tar.xz /tmp/imaker-ffbin
    chmod 755 /tmp/imaker-ffbin/*
    export PATH=/tmp/imaker-ffbin:$PATH
fi
ffmpeg -hide_banner -version | sed -n 1p
command -v ffprobe >/dev/null || { echo "no ffprobe on PATH" >&2; exit 1; }
# FluidSynth for benchmarks/render_songs.py, where the image has none: the libraries
# gpu_wheels.sh packed, less those the image has (its own, newer ones are used)
if [ -f .gpu/fluidsynth-libs.tar.xz ] && \
        ! "$PY" -c 'import ctypes.util, sys; sys.exit(not ctypes.util.find_library("fluidsynth"))'; then
    rm -rf /tmp/imaker-fluid && mkdir -p /tmp/imaker-fluid/all /tmp/imaker-fluid/lib
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        .gpu/fluidsynth-libs.tar.xz /tmp/imaker-fluid/all
    have=$( { ldconfig -p 2>/dev/null || true; } | awk 'NR > 1 {print $1}' | sort -u)
    for f in /tmp/imaker-fluid/all/*; do
        name=$(basename "$f")
        if [ "$name" = libfluidsynth.so.3 ] || ! grep -qxF "$name" <<<"$have"; then
            mv "$f" /tmp/imaker-fluid/lib/
        fi
    done
    export IMAKER_FLUIDSYNTH_LIB=/tmp/imaker-fluid/lib/libfluidsynth.so.3
    export IMAKER_FLUIDSYNTH_PATH=/tmp/imaker-fluid/lib
    echo "FluidSynth from .gpu/: $(ls /tmp/imaker-fluid/lib | wc -l) libraries the image lacks"
fi
