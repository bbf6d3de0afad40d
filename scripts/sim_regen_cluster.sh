#!/usr/bin/env bash
# Regenerates data/sim/a100_ib.json from data/sim/a100_ib.fit.json (the
# nccl-tests logs under data/sim/nccl_tests_a100/) by running the test that
# checks the shipped file against its regeneration, with rewriting enabled.
#
#   scripts/sim_regen_cluster.sh [BUILD_DIR]     # default: build/release
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/release}"
test_bin="$(find "$build" -name sim_core_test -type f -perm -u+x | head -n 1)"
if [[ -z "$test_bin" ]]; then
  echo "sim_core_test not found under $build; build it first (cmake --build $build --target sim_core_test)" >&2
  exit 1
fi
TESSERA_SIM_REGENERATE=1 "$test_bin" --gtest_filter='A100Cluster.ShippedFileEqualsItsRegeneration'
git -C "$root" diff --stat -- data/sim/a100_ib.json || true
