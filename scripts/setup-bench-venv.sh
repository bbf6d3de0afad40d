#!/usr/bin/env bash
# Creates the Python environment of the benchmarks' PyTorch 2.x peers
# (benchmarks/dcp_bench.py: torch.distributed.checkpoint with DTensor, which
# Debian's torch 1.13 lacks) and prints its interpreter's path.
#
#   scripts/setup-bench-venv.sh [VENV]     # default: build/bench-venv
#
# A plain virtual environment of /usr/bin/python3 (not seeing Debian's
# torch 1.13) with torch and numpy from PyPI, pinned. PyPI's Linux wheel of
# torch is the CUDA build and pulls the nvidia-* runtime wheels (about 3 GB
# in all); no GPU is needed: the benchmarks run it on the CPU. PyPI carries
# no CPU-only wheel of torch. Idempotent: an environment that already
# imports the pinned torch is reused.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/build/bench-venv}
torch_version=${TESSERA_BENCH_TORCH:-2.5.1}
numpy_version=${TESSERA_BENCH_NUMPY:-2.1.3}
python=$venv/bin/python
have() {
  "$python" -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '$torch_version' else 1)" \
    >/dev/null 2>&1
}
if [ -x "$python" ] && have; then echo "$python"; exit 0; fi
[ -x "$python" ] || /usr/bin/python3 -m venv "$venv" >&2
"$python" -m pip install --quiet --disable-pip-version-check \
  "torch==$torch_version" "numpy==$numpy_version" >&2 || {
  echo "setup-bench-venv: error: could not install torch==$torch_version from PyPI into $venv" >&2
  exit 1
}
have || { echo "setup-bench-venv: error: torch $torch_version does not import in $venv" >&2; exit 1; }
echo "$python"
