#!/usr/bin/env bash
# The whole test suite, as CI runs it: install dependencies, build, run every test; then the same
# suite under AddressSanitizer + UBSan; then each libFuzzer target for a bounded time.
# QT_SKIP_SANITIZE=1 / QT_SKIP_FUZZ=1 skip the slow parts locally; QT_FUZZ_SECONDS sets the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
jobs=$(nproc)

echo "== build (Release, -Werror)"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DQT_WERROR=ON >/dev/null
ninja -C build -j"$jobs"
echo "== tests"
ctest --test-dir build --output-on-failure -j"$jobs"

if [ "${QT_SKIP_SANITIZE:-0}" != 1 ]; then
  echo "== tests under AddressSanitizer + UBSan"
  # -O1 -g1 (line tables: file:line in the reports) instead of -O2 -g: a third cheaper to compile.
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
    -DQT_WERROR=ON -DQT_SANITIZE=ON >/dev/null
  ninja -C build-asan -j"$jobs"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs" -LE slow
fi

if [ "${QT_SKIP_FUZZ:-0}" != 1 ] && [ -x scripts/fuzz.sh ]; then
  echo "== fuzzing"
  ./scripts/fuzz.sh "${QT_FUZZ_SECONDS:-60}"
fi
echo "qwentune: all test stages passed"
