#!/usr/bin/env bash
# Tokenizer benchmark and HF cross-check in one call on the GPU machine (its CPU only):
#   1. a deterministic ~10 MB corpus (make_corpus.py: Python stdlib code + multilingual text);
#   2. HF edge-case fixture (tools/tokenizer_ref/hf_edge_cases.py) and qwentune's ids on it;
#   3. qwentune tokenize, 1 thread (one encode call per string) and all cores (encode_batch);
#   4. HF tokenizers and tiktoken (bench_py.py), HF ids of the corpus and of the committed fixture;
#   5. qwentune's corpus ids against HF's.
# The qwentune binary must be portable (cmake -DQT_STATIC_DEPS=ON) and is passed in `carry`:
#   cp build-tokbench/qwentune .carry/tokbench/  and carry ".carry/tokbench".
# Results go to $OUT (cpu.txt, ours.txt, py.txt, results.json, *_compare.txt, qwen3_hf_edge.json).
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${QT_BIN:-.carry/tokbench/qwentune}
TOKDIR=data/qwen3-tokenizer
OUT=${OUT:-/tmp/tokbench_out}
W=/tmp/tokbench_work
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
date -u | tee "$OUT/cpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)|Thread\(s\)|MHz" | tee -a "$OUT/cpu.txt"
python3 bench/tokenizer/make_corpus.py "$W/corpus.json" 10
python3 tools/tokenizer_ref/hf_edge_cases.py "$TOKDIR/tokenizer.json" "$OUT/qwen3_hf_edge.json"
python3 -c "import json,sys; json.dump([c['text'] for c in json.load(open(sys.argv[1]))['cases']], open(sys.argv[2],'w'))" \
  "$OUT/qwen3_hf_edge.json" "$W/edge_texts.json"
"$BIN" tokenize --tokenizer "$TOKDIR" --in "$W/edge_texts.json" --out "$W/edge_ours.json" --threads 1
python3 bench/tokenizer/compare_ids.py "$OUT/qwen3_hf_edge.json" "$W/edge_ours.json" | tee "$OUT/edge_compare.txt"
{
  echo "threads 1:"; "$BIN" tokenize --tokenizer "$TOKDIR" --in "$W/corpus.json" --out "$W/ours1.json" --threads 1 --stats --repeat 3
  echo "threads 0 (all cores):"; "$BIN" tokenize --tokenizer "$TOKDIR" --in "$W/corpus.json" --out "$W/oursN.json" --threads 0 --stats --repeat 5
} 2>&1 | tee "$OUT/ours.txt"
cmp -s "$W/ours1.json" "$W/oursN.json" && echo "1-thread and all-core ids identical" | tee -a "$OUT/ours.txt"
python3 bench/tokenizer/bench_py.py "$W/corpus.json" "$TOKDIR/tokenizer.json" "$W/hf_ids.json" "$OUT/results.json" \
  tests/data/tokenizer/qwen3_reference.json 2>&1 | tee "$OUT/py.txt"
python3 bench/tokenizer/compare_ids.py "$W/hf_ids.json" "$W/ours1.json" "$W/corpus.json" | tee "$OUT/corpus_compare.txt"
