#!/usr/bin/env bash
# QLoRA (NF4 base on the GPU) beside our own bf16 run: qwentune bench --device cuda on the same shape
# without and with --load-in-4bit, in one call on the GPU machine, then the ratios against issue 8's
# targets. Usage:
#   QWENTUNE=build-cuda/qwentune bash bench/cuda_qlora.sh [OUTDIR]
# CASES (default "qwen2.5-7b qwen3-30b-a3b-experts"):
#   qwen2.5-7b B=2 all linear (target: peak <= 8 GiB, >= 0.80 of bf16 tok/s)
#   qwen3-30b-a3b-experts B=1 attention + every expert (target: <= 16 GiB, >= 0.60 of bf16 tok/s)
#   qwen3-30b-a3b-attn B=1 attention only (no target of its own: how close the NF4 base gets to 16 GiB)
# LoRA r=16 alpha=16, S=2048, random weights. The 4-bit runs keep the input embeddings in host memory
# (the default with --load-in-4bit); EMBED_ON_DEVICE=1 adds a 4-bit run with them on the GPU;
# OFFLOAD_LORA=1 adds a 4-bit run with the LoRA masters, gradients and moments in host memory;
# EXPERT_CHUNK=K adds one with them in host memory and the NF4 experts dequantized K at a time.
# EXTRA: more `qwentune bench` arguments for every run (e.g. "--offload-activations").
# Prints one JSON line per run and a table.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/bench_common.sh
Q=${QWENTUNE:-build-cuda/qwentune}
OUTDIR=${1:-${OUT:-/tmp}}
CASES=${CASES:-"qwen2.5-7b qwen3-30b-a3b-experts"}
: > "$OUTDIR/qlora.jsonl"
for c in $CASES; do
  case $c in
    qwen2.5-7b) args="--config bench/configs/qwen2.5-7b.json --batch 2 --lora-targets all" ;;
    qwen3-30b-a3b-experts) args="--config bench/configs/qwen3-30b-a3b.json --batch 1 --lora-targets all" ;;
    qwen3-30b-a3b-attn) args="--config bench/configs/qwen3-30b-a3b.json --batch 1 --lora-targets attn" ;;
    *) echo "unknown case $c"; exit 2 ;;
  esac
  variants=("" "--load-in-4bit")
  [ "${EMBED_ON_DEVICE:-0}" = 1 ] && variants+=("--load-in-4bit --offload-embeddings false")
  [ "${OFFLOAD_LORA:-0}" = 1 ] && variants+=("--load-in-4bit --offload-lora")
  [ -n "${EXPERT_CHUNK:-}" ] && variants+=("--load-in-4bit --offload-lora --nf4-expert-chunk $EXPERT_CHUNK")
  for q in "${variants[@]}"; do
    bench_case "$Q" "$c" "$OUTDIR/qlora.jsonl" $args --seq 2048 --lora-r 16 --lora-alpha 16 --device cuda --warmup 2 --steps 5 ${EXTRA:-} $q
  done
done
python3 - "$OUTDIR/qlora.jsonl" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
targets = {"qwen2.5-7b": (8.0, 0.80), "qwen3-30b-a3b-experts": (16.0, 0.60), "qwen3-30b-a3b-attn": (16.0, 0.60)}
print(f"{'shape':22} {'embed':>6} {'lora':>5} {'chunk':>5} {'bf16 tok/s':>10} {'nf4 tok/s':>10} {'ratio':>6} {'bf16 GiB':>9} {'nf4 GiB':>8} {'nf4 buffers GiB':>16} {'target':>14}")
for case, (gib, ratio) in targets.items():
    b = [r for r in runs if r["case"] == case and not r.get("load_in_4bit")]
    if not b: continue
    b = b[0]
    for q in [r for r in runs if r["case"] == case and r.get("load_in_4bit")]:
        where = "host" if q.get("embeddings_on_host") else "gpu"
        states = "host" if q.get("lora_states_on_host") else "gpu"
        chunk = q.get("nf4_expert_chunk", 0) or "all"
        print(f"{case:22} {where:>6} {states:>5} {chunk!s:>5} {b['tokens_per_s']:10.0f} {q['tokens_per_s']:10.0f} {q['tokens_per_s'] / b['tokens_per_s']:5.2f}x "
              f"{b['peak_gpu_gib']:9.2f} {q['peak_gpu_gib']:8.2f} {q['decoder_buffers_gib']:16.2f}   <={gib:g} GiB >={ratio:.2f}")
PY
