#!/usr/bin/env bash
# Installs dependencies, builds qwentune, and runs the embedded default on the CPU: the bundled tiny
# Qwen3-MoE-shaped model (configs/tiny-qwen3-moe.json, random init), LoRA on every linear layer and
# every expert, timed forward + backward to the LoRA gradients.
# (When the trainer lands, this becomes a fine-tune of the bundled sample chat data.)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/build.sh
echo "== qwentune bench on the embedded default (CPU, tiny Qwen3-MoE, LoRA r=16 on all targets)"
./build/qwentune bench --config configs/tiny-qwen3-moe.json --batch 1 --seq 256 --lora-targets all --steps 3
