#!/usr/bin/env bash
# Builds llama.cpp's benchmark tools (llama-bench, llama-batched-bench) and its
# OpenAI-compatible server (llama-server) for this CPU from the source vendored
# in PyPI's llama-cpp-python sdist, outside the source tree: the side-by-side
# numbers of benchmarks/qspec_bench, and the real endpoint the evaluation
# harness's HTTP backend is tested against (tests/eval). Prints the directory
# holding the binaries.
#
#   scripts/build-llama-cpp.sh [BUILD_ROOT]   # default: ${XDG_CACHE_HOME:-~/.cache}/tessera-llama.cpp
#
# Needs network access to PyPI, cmake and a C++ compiler. Idempotent: an
# existing build is reused.
set -euo pipefail
root="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera-llama.cpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
bin="$root/build/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-batched-bench" ] && [ -x "$bin/llama-server" ]; then echo "$bin"; exit 0; fi
mkdir -p "$root"
cd "$root"
if [ ! -d src ]; then
  "${PYTHON:-python3}" -m pip download --quiet --no-binary :all: --no-deps \
    "llama-cpp-python==$version" -d sdist >&2
  mkdir -p src
  tar xzf sdist/llama_cpp_python-"$version".tar.gz -C src --strip-components=1
fi
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build build --target llama-bench llama-batched-bench llama-server -j "$(nproc)" >&2
echo "$bin"
