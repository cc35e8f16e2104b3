#!/usr/bin/env bash
# GGUF round trip through llama.cpp, too slow for the test suite (see bench/bench_gguf.py):
# downloads the llama-cpp-python sdist, which vendors llama.cpp with convert_hf_to_gguf.py and
# gguf-py, builds it with scikit-build-core into a virtualenv outside the checkout, then runs
# bench/bench_gguf.py with that virtualenv (it sees this environment's packages too).
#
#     nice bash bench/bench_gguf.sh                 # work dir ${BENCH_GGUF_DIR:-~/.cache/bench_gguf}
#     CMAKE_ARGS="-DGGML_NATIVE=ON" BENCH_GGUF_DIR=/tmp/gguf-native bash bench/bench_gguf.sh
#
# The default build targets AVX2 rather than this CPU (-march=native): on an AMX-capable Xeon VM
# the native build, which turns on ggml's AMX kernels, crashed (SIGSEGV in llama_decode) on the
# Q8_0 and Q4_K_M models, while f32/f16 ran. The build takes 5-20 minutes on 2 cores; the wheel
# is kept in the work dir and reused (delete its wheels/ to rebuild, or use another
# BENCH_GGUF_DIR for other CMAKE_ARGS). Extra arguments go to bench_gguf.py. Nothing of
# llama.cpp is written into the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
WORK=${BENCH_GGUF_DIR:-$HOME/.cache/bench_gguf}
PY=$WORK/venv/bin/python
SDIST=$WORK/llama_cpp_python-$VERSION.tar.gz
mkdir -p "$WORK"
[ -x "$PY" ] || python3 -m venv --system-site-packages "$WORK/venv"
"$PY" -m pip install -q scikit-build-core
[ -f "$SDIST" ] || "$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION"

wheel() { ls "$WORK"/wheels/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }
if [ -z "$(wheel)" ]; then
  export CMAKE_ARGS=${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON}
  echo "building llama-cpp-python $VERSION (CMAKE_ARGS=$CMAKE_ARGS)"
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel -q --no-cache-dir --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST"
  echo "built in $(($(date +%s) - start)) s: $(wheel)"
fi
"$PY" -m pip install -q --force-reinstall --no-deps "$(wheel)"
"$PY" -m pip install -q "$(wheel)"  # its small dependencies (diskcache, jinja2), where missing

rm -rf "$WORK/src"
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src"
"$PY" bench/bench_gguf.py --llama_cpp_dir "$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp" "$@"
