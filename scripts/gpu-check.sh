#!/usr/bin/env bash
# The one command to run on a GPU machine (one NVIDIA GPU, no network,
# PyTorch 2.x with CUDA and NCCL installed for python3, CMake, ninja, nvcc).
#
#   scripts/fetch-gpu-debs.sh            # first, on a Debian machine with network
#   scripts/gpu-check.sh [OUT_DIR]       # then, on the GPU machine
#
# Unpacks the carried .deb files (.deps/debs) under /tmp (never over /),
# configures against PyTorch's LibTorch with CUDA on, builds, runs the tests
# labelled gpu, the unit tests, the collectives on NCCL (one rank per GPU:
# NCCL refuses two ranks on one device), the GPU benchmarks, and writes a
# summary to OUT_DIR/gpu-check-summary.md. GPU_CHECK_FULL=1 also runs the
# multi-rank Gloo tests. GPU_CHECK_QUICK=1 builds only what the GPU steps
# need (the tests labelled gpu, the NCCL collectives test, tessera-launch,
# the permutation benchmark; the gRPC modules off) and skips the unit tests:
# a few minutes on 16 cores instead of the whole tree. If the build fails,
# the CUDA kernels and their tests are still built alone with nvcc and run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-build/gpu-check}}
mkdir -p "$out"
summary="$out/gpu-check-summary.md"
log="$out/gpu-check.log"
: > "$log"
step() { echo "== $*" | tee -a "$log"; }
status=0
record() {  # record NAME RC (77: the test binary skipped some of its cases, named in the log)
  local mark=PASS
  if [ "$2" -eq 77 ]; then
    mark="PASS, some cases skipped (exit 77; the log names them)"
  elif [ "$2" -ne 0 ]; then
    mark="FAIL (exit $2)" && status=1
  fi
  echo "| $1 | $mark |" >> "$summary"
}

{
  echo "# GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo "- PyTorch: $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null)"
  echo
  echo "| step | result |"
  echo "|---|---|"
} > "$summary"

deps=/tmp/tessera-deps
step "unpacking carried packages into $deps"
mkdir -p "$deps"
for f in .deps/debs/*.deb; do [ -e "$f" ] && dpkg-deb -x "$f" "$deps"; done
torch_cmake=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
export CPATH="$deps/usr/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$deps/usr/lib/x86_64-linux-gnu:$(dirname "$torch_cmake")/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
prefix="$torch_cmake;$deps/usr/lib/x86_64-linux-gnu/cmake;$deps/usr/share/cmake"
# pkg-config (cpp-httplib) from the carried pkgconf, reading the carried
# .pc files with their paths moved under $deps.
export PKG_CONFIG_PATH="$deps/usr/lib/x86_64-linux-gnu/pkgconfig:$deps/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export PKG_CONFIG_SYSROOT_DIR="$deps"
pkg_args=()
[ -x "$deps/usr/bin/pkgconf" ] && pkg_args=(-DPKG_CONFIG_EXECUTABLE="$deps/usr/bin/pkgconf")
quick_args=()
targets=()
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  quick_args=(-DTESSERA_WITH_GRPC=OFF -DTESSERA_BUILD_EXAMPLES=OFF)
  targets=(--target kernels_moe_permute_test kernels_lora_bgmv_test kernels_paged_attention_test
           kernels_quant_w4_test module_paths_gpu_test dist_collectives_mp_test tessera-launch
           moe_permute_bench -- -k 0)  # ninja: build what can be built, show every error
fi

# NCCL: the toolkit's, or the one PyTorch's wheels bring (nvidia-nccl).
nccl_args=()
nccl_dir=$(python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)
if [ -n "$nccl_dir" ] && [ -e "$nccl_dir/include/nccl.h" ]; then
  nccl_lib=$(ls "$nccl_dir"/lib/libnccl.so* 2>/dev/null | head -1)
  nccl_args=(-DTESSERA_NCCL_INCLUDE_DIR="$nccl_dir/include" -DTESSERA_NCCL_LIBRARY="$nccl_lib")
  export LD_LIBRARY_PATH="$nccl_dir/lib:$LD_LIBRARY_PATH"
fi
step "configure (CUDA on, LibTorch from $torch_cmake)"
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTESSERA_CUDA=ON \
  -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_CUDA_ARCHITECTURES="80;90" "${nccl_args[@]}" \
  "${pkg_args[@]}" "${quick_args[@]}" >> "$log" 2>&1
rc=$?; record "configure" $rc
if [ $rc -eq 0 ]; then
  step "build"
  cmake --build build/gpu -j "$(nproc)" "${targets[@]}" >> "$log" 2>&1
  rc=$?; record "build" $rc
fi
if [ $rc -ne 0 ]; then
  # Without the full build, still check the CUDA kernels against their CPU
  # references: they need only nvcc and GoogleTest.
  step "fallback: kernels and their tests alone"
  mkdir -p build/gpu-kernels
  if nvcc -O2 -std=c++17 -arch=sm_90 -Ikernels -I"$deps/usr/include" \
       kernels/moe/permute.cu kernels/lora/bgmv.cu kernels/attention/paged_attention.cu \
       tests/kernels/moe_permute_test.cpp tests/kernels/lora_bgmv_test.cpp \
       tests/kernels/paged_attention_test.cpp \
       -L"$deps/usr/lib/x86_64-linux-gnu" -lgtest_main -lgtest \
       -o build/gpu-kernels/kernel_tests >> "$log" 2>&1; then
    build/gpu-kernels/kernel_tests >> "$log" 2>&1; record "kernel tests (fallback build)" $?
  else
    record "kernel tests (fallback build)" 1
  fi
fi
if [ $rc -eq 0 ]; then
  step "tests labelled gpu"
  ctest --test-dir build/gpu -L gpu --output-on-failure >> "$log" 2>&1; record "ctest -L gpu" $?
  if [ "${GPU_CHECK_QUICK:-0}" != 1 ]; then
    step "unit tests"
    ctest --test-dir build/gpu -L unit -j 8 --output-on-failure >> "$log" 2>&1; record "ctest -L unit" $?
  fi
  if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
    step "multi-rank tests on Gloo"
    ctest --test-dir build/gpu -L multi_rank --output-on-failure >> "$log" 2>&1; record "ctest -L multi_rank (gloo)" $?
  fi
  step "collectives on NCCL, one rank per GPU"
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  TESSERA_DIST_BACKEND=nccl build/gpu/bin/tessera-launch --nproc "${ngpu:-1}" -- \
    build/gpu/bin/dist_collectives_mp_test >> "$log" 2>&1
  record "collectives on NCCL ($ngpu rank(s))" $?
  step "GPU benchmarks"
  echo >> "$summary"
  echo "## MoE permutation kernels" >> "$summary"
  echo >> "$summary"
  echo "| shape | GPU | CPU ATen | speed-up |" >> "$summary"
  echo "|---|---|---|---|" >> "$summary"
  for shape in "4096 2 8 1024" "16384 2 64 4096" "65536 1 16 2048"; do
    # shellcheck disable=SC2086
    build/gpu/bin/moe_permute_bench $shape >> "$summary" 2>> "$log"
  done
fi
cat "$summary"
exit $status
