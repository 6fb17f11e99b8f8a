#!/usr/bin/env bash
# qwentune bench --device cuda beside HF transformers + PEFT (../shared/bench/hf_baseline.py) on the
# same shapes, in one call on the GPU machine, then the ratios. Usage:
#   QWENTUNE=build-cuda/qwentune HF_BASELINE=../shared/bench/hf_baseline.py bash bench/cuda_vs_hf.sh [OUTDIR]
# CASES (default "qwen2.5-0.5b qwen2.5-7b"): hf_baseline.py case names; each maps to a config in
# bench/configs, a batch and LoRA targets as REFERENCE.md's baselines (LoRA r=16 alpha=16, S=2048,
# random weights):
#   qwen2.5-0.5b B=8 all linear, qwen2.5-7b B=2 all linear,
#   qwen3-30b-a3b B=2 attention only, qwen3-30b-a3b-experts B=2 attention + every expert.
# EXTRA: more `qwentune bench` arguments for every case (e.g. "--offload-activations").
# Prints one JSON line per run and a ratio table.
set -uo pipefail
cd "$(dirname "$0")/.."
Q=${QWENTUNE:-build-cuda/qwentune}
HF=${HF_BASELINE:-../shared/bench/hf_baseline.py}
OUTDIR=${1:-${OUT:-/tmp}}
CASES=${CASES:-"qwen2.5-0.5b qwen2.5-7b"}
: > "$OUTDIR/qwentune.jsonl"
for c in $CASES; do
  case $c in
    qwen2.5-0.5b) args="--config bench/configs/qwen2.5-0.5b.json --batch 8 --lora-targets all" ;;
    qwen2.5-7b) args="--config bench/configs/qwen2.5-7b.json --batch 2 --lora-targets all" ;;
    qwen3-30b-a3b) args="--config bench/configs/qwen3-30b-a3b.json --batch 2 --lora-targets attn" ;;
    qwen3-30b-a3b-experts) args="--config bench/configs/qwen3-30b-a3b.json --batch 2 --lora-targets all" ;;
    *) echo "unknown case $c"; exit 2 ;;
  esac
  line=$(timeout 240 "$Q" bench $args ${EXTRA:-} --seq 2048 --device cuda --warmup 2 --steps 5 | grep '^{')
  echo "$line"
  [ -n "$line" ] && python3 -c 'import json,sys; d=json.loads(sys.argv[2]); d["case"]=sys.argv[1]; print(json.dumps(d))' \
    "$c" "$line" >> "$OUTDIR/qwentune.jsonl"
done
PYTHONUNBUFFERED=1 timeout 420 python3 "$HF" $CASES 2>&1 | grep '^{' | tee "$OUTDIR/hf.jsonl"
python3 - "$OUTDIR/qwentune.jsonl" "$OUTDIR/hf.jsonl" <<'PY'
import json, sys
q = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
h = {d["case"]: d for d in (json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")) if "case" in d}
print(f"{'shape':22} {'qwentune tok/s':>15} {'HF tok/s':>9} {'speed':>6} {'qwentune GiB':>13} {'HF GiB':>7}")
for r in q:
    case = r["case"]
    if case not in h or "tok_per_s" not in h[case]: continue
    b = h[case]
    print(f"{case:22} {r['tokens_per_s']:15.0f} {b['tok_per_s']:9.0f} {r['tokens_per_s'] / b['tok_per_s']:5.2f}x "
          f"{r['peak_gpu_gib']:13.2f} {b['peak_gib']:7.2f}")
PY
