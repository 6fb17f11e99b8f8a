#!/usr/bin/env bash
# Installs every Debian package qwentune's build and tests need. Safe to run again.
set -euo pipefail
PKGS=(build-essential cmake ninja-build pkg-config git python3
      nlohmann-json3-dev libpcre2-dev libcli11-dev libyaml-cpp-dev libfmt-dev libopenblas-dev
      libgtest-dev libcurl4-openssl-dev clang libclang-rt-dev libomp-dev)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
echo "qwentune: build dependencies present"
