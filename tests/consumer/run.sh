#!/usr/bin/env bash
# Installs the build tree into a scratch prefix, builds tests/consumer against
# it with find_package(Tessera), and runs the result.
#   run.sh BUILD_DIR SOURCE_DIR SCRATCH_DIR
set -euo pipefail
build=$1 src=$2 scratch=$3
rm -rf "$scratch"
cmake --install "$build" --prefix "$scratch/prefix" > "$scratch.install.log" 2>&1 || { cat "$scratch.install.log"; exit 1; }
cmake -S "$src/tests/consumer" -B "$scratch/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$scratch/prefix" > "$scratch.configure.log" 2>&1 || { cat "$scratch.configure.log"; exit 1; }
cmake --build "$scratch/build" > "$scratch.build.log" 2>&1 || { cat "$scratch.build.log"; exit 1; }
# The installed binary finds its libraries through its RPATH alone.
"$scratch/build/consumer"
