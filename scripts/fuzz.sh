#!/usr/bin/env bash
# Builds the libFuzzer targets (one per fuzz/*.cpp) with clang in build-fuzz/ and runs each for
# SECONDS (default 60), all at once, from a seed corpus (valid files made here for some targets,
# plus fuzz/seeds/<target>/ and fuzz/<target>.dict where present). Exits non-zero
# when any fuzzer finds a crash, a sanitizer report, a leak, a timeout or an out-of-memory; the
# input that triggered it is kept in build-fuzz/artifacts/ (replay: build-fuzz/<target> <file>).
# Usage: scripts/fuzz.sh [SECONDS]. QT_FUZZ_JOBS sets build parallelism (default 2).
set -euo pipefail
seconds=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
src=${QT_FUZZ_SOURCE_DIR:-$root}   # another source tree (e.g. with a patched CMakeLists.txt)
build=${QT_FUZZ_BUILD_DIR:-$root/build-fuzz}
jobs=${QT_FUZZ_JOBS:-2}

command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (scripts/setup.sh installs it)" >&2; exit 1; }
targets=()
for f in "$src"/fuzz/*.cpp; do targets+=("$(basename "$f" .cpp)"); done
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: no fuzz/*.cpp" >&2; exit 1; }

echo "== fuzz: building ${targets[*]}"
# -O1 with line tables only, as OSS-Fuzz builds: cheaper to compile than RelWithDebInfo's -O2 -g.
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only -DNDEBUG" -DQT_FUZZ=ON -DQT_BUILD_TESTS=OFF -DQT_WERROR=OFF >/dev/null
ninja -C "$build" -j"$jobs" "${targets[@]}"

work=$(mktemp -d "${TMPDIR:-/tmp}/qt_fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
artifacts="$build/artifacts"
mkdir -p "$artifacts"

# Seeds and dictionaries, made here for the safetensors and config targets: valid safetensors files (padded and unpadded headers, every dtype, zero-size
# and scalar tensors, metadata) and HF config.json files of each supported family.
python3 - "$work" "$root" <<'PY'
import glob, json, os, shutil, struct, sys
work, root = sys.argv[1], sys.argv[2]
st, cfg = os.path.join(work, "seeds_fuzz_safetensors"), os.path.join(work, "seeds_fuzz_hf_config")
os.makedirs(st); os.makedirs(cfg)
sizes = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1}

def safetensors(tensors, metadata=None, pad=True):
    header, data = {}, b""
    if metadata: header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = sizes[dtype]
        for d in shape: n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += bytes((i * 37 + 11) % 256 for i in range(n))
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad: text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data

seeds = {
    "one": safetensors([("w", "F32", [2, 3])], {"format": "pt"}),
    "dtypes": safetensors([(t.lower(), t, [3]) for t in sizes]),
    "unpadded": safetensors([("model.norm.weight", "BF16", [5]), ("lm_head.weight", "F32", [2, 2])], pad=False),
    "shapes": safetensors([("empty", "F32", [0, 4]), ("scalar", "I64", []), ("t", "U8", [1, 2, 1, 2])]),
    "empty": safetensors([]),
}
for k, v in seeds.items():
    open(os.path.join(st, k), "wb").write(v)
with open(os.path.join(work, "fuzz_safetensors.dict"), "w") as f:
    for w in ["dtype", "shape", "data_offsets", "__metadata__", "format", "pt", *sizes, "F8_E4M3"]:
        f.write(json.dumps(json.dumps(w)) + "\n")
    for w in ["[0,0]", "[0,8]", "[8,4]", "18446744073709551615", "9223372036854775807", "-1", "1e300", "{}"]:
        f.write(json.dumps(w) + "\n")

qwen2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
         "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
         "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "use_sliding_window": False}
qwen3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 1024,
         "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 128, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
         "attention_bias": False, "max_position_embeddings": 40960, "rope_scaling": None}
moe = {"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
       "moe_intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 2,
       "mlp_only_layers": [0, 3], "output_router_logits": True, "router_aux_loss_coef": 0.001}
for k, v in {"qwen2": qwen2, "qwen3": qwen3, "qwen3_moe": moe}.items():
    open(os.path.join(cfg, k), "w").write(json.dumps(v, indent=1))
for i, p in enumerate(sorted(glob.glob(os.path.join(root, "configs", "*.json")))):
    shutil.copy(p, os.path.join(cfg, "repo_%d" % i))
with open(os.path.join(work, "fuzz_hf_config.dict"), "w") as f:
    keys = set(qwen2) | set(qwen3) | set(moe) | {"qwen2", "qwen3", "qwen3_moe"}
    for w in sorted(keys):
        f.write(json.dumps(json.dumps(w)) + "\n")
# Dataset target: the first byte picks the format (0 auto, 1 text, 2 messages, 3 alpaca, 4 sharegpt).
import glob
ds = os.path.join(work, "seeds_fuzz_dataset"); os.makedirs(ds)
for p in sorted(glob.glob(os.path.join(root, "tests", "data", "datasets", "*"))):
    for fmt in (0, 2):
        open(os.path.join(ds, "%s_%d" % (os.path.basename(p), fmt)), "wb").write(bytes([fmt]) + open(p, "rb").read())
with open(os.path.join(work, "fuzz_dataset.dict"), "w") as f:
    for w in ["messages", "conversations", "role", "content", "assistant", "user", "system", "tool", "tool_calls",
              "function", "arguments", "reasoning_content", "instruction", "input", "output", "from", "value",
              "tools", "text", "<think>", "</think>", "<tool_response>", "</tool_response>", "QTDSET01"]:
        f.write(json.dumps(json.dumps(w)) + "\n")
PY

# Run every target at once; each keeps its own corpus (seeds + what it finds) and log. The per-input
# timeout is generous because a target's one-time setup (the tokenizer load, under ASan) counts
# towards its first input.
pids=()
for t in "${targets[@]}"; do
  corpus="$work/corpus_$t"
  mkdir -p "$corpus"
  [ -d "$work/seeds_$t" ] && cp "$work/seeds_$t"/* "$corpus"/
  [ -d "$root/fuzz/seeds/$t" ] && cp "$root/fuzz/seeds/$t"/* "$corpus"/
  dict=()
  [ -f "$work/$t.dict" ] && dict=(-dict="$work/$t.dict")
  [ -f "$root/fuzz/$t.dict" ] && dict=(-dict="$root/fuzz/$t.dict")
  "$build/$t" "$corpus" "${dict[@]}" -max_total_time="$seconds" -timeout=60 -rss_limit_mb=2048 -max_len=4096 \
    -print_final_stats=1 -artifact_prefix="$artifacts/$t-" >"$work/$t.log" 2>&1 &
  pids+=($!)
done

failed=0
for i in "${!targets[@]}"; do
  t=${targets[$i]}
  if wait "${pids[$i]}"; then
    echo "== fuzz $t: no crash in ${seconds}s ($(grep -E '^stat::number_of_executed_units' "$work/$t.log" | awk '{print $2}') runs)"
  else
    failed=1
    echo "== fuzz $t: FAILED; last lines of its log:"
    tail -n 60 "$work/$t.log"
    ls -1 "$artifacts" | sed "s|^|   artifact: $artifacts/|"
  fi
done
exit $failed
