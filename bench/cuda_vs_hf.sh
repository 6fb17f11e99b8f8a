#!/usr/bin/env bash
# qwentune bench --device cuda beside HF transformers + PEFT (../shared/bench/hf_baseline.py) on the
# same shapes, in one call on the GPU machine, then the ratios. Usage:
#   QWENTUNE=build-cuda/qwentune HF_BASELINE=../shared/bench/hf_baseline.py bash bench/cuda_vs_hf.sh [OUTDIR]
# Shapes (REFERENCE.md's baselines): Qwen2.5-0.5B B=8 S=2048 and Qwen2.5-7B B=2 S=2048, LoRA r=16
# alpha=16 on all linear layers, random weights. Prints one JSON line per run and a ratio table.
set -uo pipefail
cd "$(dirname "$0")/.."
Q=${QWENTUNE:-build-cuda/qwentune}
HF=${HF_BASELINE:-../shared/bench/hf_baseline.py}
OUTDIR=${1:-${OUT:-/tmp}}
: > "$OUTDIR/qwentune.jsonl"
for spec in "qwen2.5-0.5b 8" "qwen2.5-7b 2"; do
  set -- $spec
  timeout 180 "$Q" bench --config bench/configs/$1.json --batch $2 --seq 2048 --lora-targets all --device cuda \
    --warmup 2 --steps 5 | tee -a "$OUTDIR/qwentune.jsonl"
done
PYTHONUNBUFFERED=1 timeout 300 python3 "$HF" qwen2.5-0.5b qwen2.5-7b 2>&1 | grep '^{' | tee "$OUTDIR/hf.jsonl"
python3 - "$OUTDIR/qwentune.jsonl" "$OUTDIR/hf.jsonl" <<'PY'
import json, sys
q = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
h = {d["case"]: d for d in (json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")) if "case" in d}
print(f"{'shape':14} {'qwentune tok/s':>15} {'HF tok/s':>9} {'speed':>6} {'qwentune GiB':>13} {'HF GiB':>7}")
for r in q:
    case = r["config"].split("/")[-1].removesuffix(".json")
    if case not in h: continue
    b = h[case]
    print(f"{case:14} {r['tokens_per_s']:15.0f} {b['tok_per_s']:9.0f} {r['tokens_per_s'] / b['tok_per_s']:5.2f}x "
          f"{r['peak_gpu_gib']:13.2f} {b['peak_gib']:7.2f}")
PY
