// `qwentune quantize --model DIR --out DIR [--force] [--shard-size 5GB]`: writes a bitsandbytes NF4 4-bit checkpoint
// of a float model (model/quantize_checkpoint.h), loadable by transformers and as a QLoRA base.
#include <chrono>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/merge.h"
#include "model/quantize_checkpoint.h"

namespace qt::cli {

void register_quantize_command(CLI::App& app) {
  auto opt = std::make_shared<QuantizeOptions>();
  auto* c = app.add_subcommand("quantize", "Write a bitsandbytes NF4 (4-bit, double-quantized) copy of a model folder");
  c->add_option("--model", opt->model_dir, "Model folder (config.json + bf16/f16/f32 safetensors)")->required();
  c->add_option("--out", opt->out_dir, "Output folder (must not exist or be empty, unless --force)")->required();
  c->add_flag("--force", opt->force, "Write into an existing folder");
  auto shard_size = std::make_shared<std::string>("5GB");
  c->add_option("--shard-size", *shard_size, "Largest output shard, e.g. 5GB (default), 500MB, 2GiB");
  c->callback([opt, shard_size] {
    opt->shard_bytes = parse_byte_size(*shard_size, "quantize");
    const auto t0 = std::chrono::steady_clock::now();
    const QuantizeSummary s = quantize_checkpoint(*opt);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("quantized {} matrices to NF4, kept {} tensors in float ({:.2f} MB, {} shard{}) in {:.1f} s -> {}\n",
               s.quantized, s.kept, double(s.bytes) / 1e6, s.shards, s.shards == 1 ? "" : "s", secs, opt->out_dir);
  });
}

}  // namespace qt::cli
