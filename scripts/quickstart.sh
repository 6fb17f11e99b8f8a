#!/usr/bin/env bash
# Installs dependencies, builds qwentune, and runs the embedded default on the CPU: LoRA fine-tuning of
# the bundled tiny Qwen3-MoE-shaped model (configs/tiny-qwen3-moe.json, random init, the real Qwen3
# tokenizer in data/qwen3-tokenizer) on the bundled sample chat data (data/sample/chat.jsonl).
# The adapter lands in out/tiny-default/ (adapter_config.json + adapter_model.safetensors, loss.svg,
# metrics.jsonl); then the trained adapter answers one of the sample's questions.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
echo "== qwentune train configs/tiny-default.yaml (CPU)"
./build/qwentune train configs/tiny-default.yaml
echo "== qwentune generate: a question from the sample, answered by the base + the new adapter"
./build/qwentune generate --model configs/tiny-qwen3-moe.json --adapter out/tiny-default \
  --prompt "Name the largest planet in our solar system." --greedy --max-new-tokens 40
