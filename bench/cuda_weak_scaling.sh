#!/usr/bin/env bash
# Weak scaling of data-parallel LoRA training (issue 9): `qwentune bench --gpus N` (N ranks, each its
# own random micro-batch of B x 2048 tokens, gradients all-reduced over NCCL during the backward)
# against `--gpus 1` (the same engine path, one rank), in one call on a multi-GPU machine.
#   efficiency(N) = tokens_per_s(N) / (N * tokens_per_s(1))        (target: >= 0.90)
# Usage: QWENTUNE=build-cuda/qwentune bash bench/cuda_weak_scaling.sh [OUTDIR]
# GPUS (default: every visible GPU), CASES (default "qwen2.5-7b qwen3-30b-a3b-experts").
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/bench_common.sh
Q=${QWENTUNE:-build-cuda/qwentune}
OUTDIR=${1:-${OUT:-/tmp}}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
CASES=${CASES:-"qwen2.5-7b qwen3-30b-a3b-experts"}
: > "$OUTDIR/weak_scaling.jsonl"
for c in $CASES; do
  case $c in
    qwen2.5-7b) args="--config bench/configs/qwen2.5-7b.json --batch 2 --lora-targets all" ;;
    qwen3-30b-a3b-experts) args="--config bench/configs/qwen3-30b-a3b.json --batch 2 --lora-targets all" ;;
    *) echo "unknown case $c"; exit 2 ;;
  esac
  for n in 1 "$GPUS"; do
    bench_case "$Q" "$c" "$OUTDIR/weak_scaling.jsonl" $args --seq 2048 --lora-r 16 --lora-alpha 16 --device cuda \
      --warmup 2 --steps 5 --gpus "$n"
  done
done
python3 - "$OUTDIR/weak_scaling.jsonl" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'shape':24} {'GPUs':>4} {'tok/s':>10} {'tok/s/GPU':>10} {'efficiency':>10}")
for case in dict.fromkeys(r["case"] for r in runs):
    one = [r for r in runs if r["case"] == case and r["world_size"] == 1]
    for r in (x for x in runs if x["case"] == case):
        eff = r["tokens_per_s"] / (r["world_size"] * one[0]["tokens_per_s"]) if one else float("nan")
        print(f"{case:24} {r['world_size']:4d} {r['tokens_per_s']:10.0f} {r['tokens_per_s_per_gpu']:10.0f} {eff:10.3f}")
PY
