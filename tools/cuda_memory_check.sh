#!/usr/bin/env bash
# On a GPU machine: the checks and the measurement of the QLoRA memory work (offload_lora,
# nf4_expert_chunk) in one call, with binaries built elsewhere. Usage:
#   QT_CUDA_PREBUILT=DIR bash tools/cuda_memory_check.sh
# DIR holds qwentune, test_cuda_decoder, test_cuda_qlora, test_cuda_nf4, test_cuda_train and
# test_cuda_moe_layer built from this checkout (`cmake -DQT_CUDA=ON -DQT_STATIC_DEPS=ON
# -DCMAKE_CUDA_ARCHITECTURES=90a`). The tests find the source tree and the CLI by the absolute paths
# they were built with (QT_SOURCE_DIR, QT_BINARY): link this checkout there first if it lies elsewhere.
# Logs go to $OUT (or ./cuda-memory-logs); the table of bench/cuda_qlora.sh comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
B="${QT_CUDA_PREBUILT:?set QT_CUDA_PREBUILT to the folder of the CUDA binaries}"
LOGS="${OUT:-$PWD/cuda-memory-logs}"
mkdir -p "$LOGS"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# the CUDA train tests run the CLI at QT_BINARY (build-cuda/qwentune of the build tree by default)
mkdir -p build-cuda && { [ -x build-cuda/qwentune ] || cp "$B/qwentune" build-cuda/; }
summary() { grep -E '^\[  (PASSED|FAILED) |^\[  FAILED  \]' "$1" | tr '\n' ' '; echo; }
status=0
run_test() {  # name, timeout, binary, gtest filter
  local t0=$(date +%s)
  timeout "$2" "$B/$3" --gtest_filter="$4" > "$LOGS/$1.log" 2>&1 || status=1
  echo "$1: $(summary "$LOGS/$1.log") ($(( $(date +%s) - t0 )) s)"
  grep -h -A6 'Failure' "$LOGS/$1.log" | head -24
}
run_test decoder_offload 120 test_cuda_decoder 'CudaDecoder.*OnHost*:CudaDecoder.LoraStates*:CudaDecoder.NonFinite*'
run_test qlora 150 test_cuda_qlora '*'
run_test nf4 60 test_cuda_nf4 'CudaNf4.BatchedDequantizeEqualsCpuPerTensor'
run_test train_offload 120 test_cuda_train 'CudaTrain.Offload*'
run_test moe_layer 120 test_cuda_moe_layer '*'
CASES=qwen3-30b-a3b-experts EXTRA="--offload-activations" OFFLOAD_LORA=1 EXPERT_CHUNK=16 QWENTUNE="$B/qwentune" \
  bash bench/cuda_qlora.sh "$LOGS" 2>&1 | tee "$LOGS/bench.log" | tail -8
exit $status
