#!/usr/bin/env bash
# Configures and builds qwentune into build/ (Release, warnings as errors). Extra args go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DQT_WERROR=ON "$@" >/dev/null
ninja -C build -j"$(nproc)"
