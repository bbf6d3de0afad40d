#!/usr/bin/env bash
# Checks that every library source compiles against a LibTorch 2.x (the
# API the GPU machine's PyTorch has), including the c10d NCCL path, without
# building or linking: g++ -fsyntax-only over each file.
#
#   scripts/check-libtorch2.sh TORCH_DIR
#
# TORCH_DIR is the `torch` folder of a PyTorch 2.x installation or wheel
# (it holds include/ and share/cmake/Torch). Gloo's headers come from
# Debian's libgloo-dev (PyTorch wheels do not ship them); NCCL and CUDA
# headers from /usr/local/cuda.
set -euo pipefail
torch=${1:?usage: check-libtorch2.sh TORCH_DIR}
cd "$(dirname "$0")/.."
cuda=${CUDA_HOME:-/usr/local/cuda}
flags=(-std=c++17 -fsyntax-only -Iinclude -isystem "$torch/include"
       -isystem "$torch/include/torch/csrc/api/include" -isystem "$cuda/include"
       -DUSE_C10D_GLOO -DUSE_DISTRIBUTED -DUSE_C10D_NCCL -DTESSERA_WITH_C10D_NCCL
       -DTESSERA_WITH_NCCL_LIB -D_GLIBCXX_USE_CXX11_ABI=0 -w)
status=0
for f in src/core/*.cpp src/dist/*.cpp src/nn/*.cpp src/tools/*/*.cpp; do
  if nice -n 10 g++ "${flags[@]}" -Isrc/dist -Isrc/nn "$f" 2> /tmp/check-libtorch2.err; then
    echo "ok    $f"
  else
    echo "FAIL  $f"; head -20 /tmp/check-libtorch2.err; status=1
  fi
done
exit $status
