#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: configure and build the CUDA backend, its tests and bench, run the GPU
# tests (ctest label `gpu`), then compute-sanitizer memcheck over the parity tests with the quick
# shape set, then the op timings. Logs go to $OUT (or ./cuda-check-logs). Usage: bash tools/cuda_check.sh [archs]
# (default 90a: one architecture keeps the build short; the CMake default builds 80;89;90a).
# QT_CUDA_PREBUILT=DIR skips the build and runs DIR/test_cuda_* (with DIR/lib on the library path):
# for a GPU machine without the project's build dependencies, the binaries built elsewhere.
set -uo pipefail
cd "$(dirname "$0")/.."
ARCHS="${1:-90a}"
LOGS="${OUT:-$PWD/cuda-check-logs}"
BUILD="${QT_CUDA_BUILD_DIR:-build-cuda}"
mkdir -p "$LOGS"
JOBS="$(nproc)"
export PATH="/usr/local/cuda/bin:$PATH"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1
  cmake --version | head -1
} 2>&1 | tee "$LOGS/env.log"

status=0
BIN="$BUILD"
if [ -n "${QT_CUDA_PREBUILT:-}" ]; then
  BIN="$QT_CUDA_PREBUILT"
  export LD_LIBRARY_PATH="$QT_CUDA_PREBUILT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== prebuilt binaries in $BIN"
else
echo "== configure + build (archs $ARCHS)"
if ! { cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQT_WERROR=ON -DQT_CUDA=ON \
         -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc &&
       ninja -C "$BUILD" -j"$JOBS" test_cuda_ops test_cuda_attention test_cuda_moe test_cuda_nccl cuda_ops_bench; } >"$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"
  echo "BUILD FAILED"
  exit 1
fi
echo "build ok"
fi

echo "== GPU tests"
for t in test_cuda_ops test_cuda_attention test_cuda_moe test_cuda_nccl; do
  start=$(date +%s)
  if ! "$BIN/$t" >"$LOGS/$t.log" 2>&1; then status=1; fi
  echo "$t: $(grep -E '^\[  (PASSED|FAILED)|SKIPPED' "$LOGS/$t.log" | tr '\n' ' ') ($(( $(date +%s) - start )) s)"
done
grep -h "^\[parity\]" "$LOGS"/test_cuda_*.log > "$LOGS/parity.txt" || true

echo "== compute-sanitizer memcheck (quick shapes)"
SAN="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
for t in test_cuda_ops test_cuda_attention test_cuda_moe; do
  if QT_CUDA_PARITY_QUICK=1 "$SAN" --tool memcheck --leak-check full --error-exitcode 3 "$BIN/$t" \
       >"$LOGS/memcheck_$t.log" 2>&1; then
    echo "memcheck $t: clean ($(grep -c '^\[parity\]' "$LOGS/memcheck_$t.log") checks)"
  else
    status=1
    echo "memcheck $t: FAILED"
    grep -m 20 -E "=========|FAILED" "$LOGS/memcheck_$t.log"
  fi
done
echo "== timings (bench/cuda/cuda_ops_bench)"
if [ -x "$BIN/cuda_ops_bench" ]; then "$BIN/cuda_ops_bench" 2>&1 | tee "$LOGS/bench.log"; fi
exit $status
