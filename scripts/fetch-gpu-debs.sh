#!/usr/bin/env bash
# Companion of scripts/gpu-check.sh, run HERE (a Debian 12 machine with
# network access to Debian's archive): downloads the .deb files of the
# libraries the GPU machine lacks into .deps/debs (ignored by git), so they
# can travel with the working tree. gpu-check.sh unpacks them under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps/debs
cd .deps/debs
pkgs=(libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 nlohmann-json3-dev
      libgtest-dev libgmock-dev libbenchmark-dev libbenchmark1debian libgloo-dev
      libcli11-dev libcpp-httplib-dev libcpp-httplib0.11 libyaml-cpp-dev libyaml-cpp0.7
      libpng-dev libpng16-16 libjpeg62-turbo-dev libjpeg62-turbo libssl-dev zlib1g-dev
      libbrotli-dev pkgconf pkgconf-bin libpkgconf3)
missing=()
for p in "${pkgs[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get download "${missing[@]}" >/dev/null
fi
ls -1 *.deb
