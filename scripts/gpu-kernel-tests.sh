#!/usr/bin/env bash
# The CUDA kernels' own tests on a GPU machine without building there.
#
#   scripts/gpu-kernel-tests.sh pack [BUILD_DIR]   # here, after a build with nvcc found
#   scripts/gpu-kernel-tests.sh run [OUT_DIR]      # on the GPU machine
#
# `pack` copies the kernel tests that need no LibTorch (MoE permutation,
# LoRA BGMV, paged attention: each checks the kernel against a CPU reference
# written in the test) with the libraries they load (libtessera_kernels and
# the CUDA runtime they were linked with) into .gpu-kernels/ (ignored by
# git), a few MiB to carry to the GPU machine. `run` runs each test there,
# then again under compute-sanitizer's memcheck when it is installed, and
# writes OUT_DIR/gpu-kernel-tests.md (default build/gpu-kernel-tests). A
# test whose every case skipped (no CUDA device) counts as a failure here:
# on the GPU machine it must run. scripts/gpu-check.sh builds and runs
# everything there instead (the LibTorch-dependent kernel tests, the
# modules' GPU paths and NCCL included) and needs the time to build.
set -uo pipefail
cd "$(dirname "$0")/.."
tests=(kernels_moe_permute_test kernels_lora_bgmv_test kernels_paged_attention_test)
pack_dir=.gpu-kernels

case "${1:-}" in
  pack)
    build=${2:-build/release}
    rm -rf "$pack_dir" && mkdir -p "$pack_dir/bin" "$pack_dir/lib"
    for t in "${tests[@]}"; do
      [ -x "$build/bin/$t" ] || { echo "gpu-kernel-tests: $build/bin/$t not built (is nvcc found?)" >&2; exit 2; }
      cp "$build/bin/$t" "$pack_dir/bin/"
    done
    # The libraries each test loads beyond the C and C++ runtimes, as plain
    # files (links do not travel).
    ldd "$build/bin/${tests[0]}" | awk '/libtessera_kernels|libcudart/ {print $3}' | while read -r lib; do
      [ -n "$lib" ] && cp -L "$lib" "$pack_dir/lib/"
    done
    du -sh "$pack_dir"
    ;;
  run)
    out=${2:-${OUT:-build/gpu-kernel-tests}}
    mkdir -p "$out"
    summary="$out/gpu-kernel-tests.md"
    export LD_LIBRARY_PATH="$PWD/$pack_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    {
      echo "# CUDA kernel tests"
      echo
      echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
      echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
      echo
      echo "| test | cases passed | skipped | result | under memcheck |"
      echo "|---|---|---|---|---|"
    } > "$summary"
    status=0
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
    for t in "${tests[@]}"; do
      log="$out/$t.log"
      "$pack_dir/bin/$t" > "$log" 2>&1
      rc=$?
      # GoogleTest's closing lines: "[  PASSED  ] N tests." and "[  SKIPPED ] N tests,".
      ran=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) test.*/\1/p' "$log" | head -1)
      skipped=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) test.*/\1/p' "$log" | head -1)
      ran=${ran:-0} skipped=${skipped:-0}
      result=PASS
      if [ $rc -ne 0 ]; then result="FAIL (exit $rc)"; status=1
      elif [ "$skipped" -gt 0 ] || [ "$ran" -eq 0 ]; then result="FAIL (skipped: no CUDA device?)"; status=1; fi
      memcheck="not installed"
      if [ -n "$sanitizer" ]; then
        "$sanitizer" --tool memcheck --error-exitcode 9 "$pack_dir/bin/$t" > "$out/$t.memcheck.log" 2>&1
        mrc=$?
        memcheck="no errors"
        if [ $mrc -ne 0 ]; then memcheck="FAIL (exit $mrc)"; status=1; fi
      fi
      echo "| $t | $ran | $skipped | $result | $memcheck |" >> "$summary"
    done
    cat "$summary"
    exit $status
    ;;
  *)
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
