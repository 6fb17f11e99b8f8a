// qwentune merge: W' = W + scale * B A for every adapted projection (experts too), written as a
// Hugging Face model directory in the input checkpoint's names and expert layout (io/merge.h).
#include <chrono>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/merge.h"

namespace qt::cli {

namespace {

struct MergeArgs {
  std::string model, adapter, out;
  std::string dtype = "bf16";
  std::string shard_size = "5GB";
  bool force = false;
};

void run_merge(const MergeArgs& a) {
  MergeOptions opt;
  opt.model_dir = a.model;
  opt.adapter_dir = a.adapter;
  opt.out_dir = a.out;
  opt.dtype = a.dtype == "f32" ? DType::F32 : a.dtype == "f16" ? DType::F16 : DType::BF16;
  opt.shard_bytes = parse_byte_size(a.shard_size);
  opt.force = a.force;
  const auto t0 = std::chrono::steady_clock::now();
  const MergeSummary s = merge_lora(opt);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string size = s.total_bytes >= 1'000'000'000ull ? fmt::format("{:.2f} GB", double(s.total_bytes) / 1e9)
                                                              : fmt::format("{:.2f} MB", double(s.total_bytes) / 1e6);
  fmt::print("merged {} LoRA matrices into {} tensors ({} {}, {} file{}) in {:.1f} s -> {}\n", s.merged_matrices,
             s.tensors, size, a.dtype, s.shards, s.shards == 1 ? "" : "s", secs, a.out);
}

}  // namespace

void register_merge_command(CLI::App& app) {
  auto args = std::make_shared<MergeArgs>();
  auto* cmd = app.add_subcommand("merge", "Merge a LoRA adapter into the base model (Hugging Face directory out)");
  cmd->add_option("--model", args->model, "Base model directory (config.json + safetensors)")->required();
  cmd->add_option("--adapter", args->adapter, "PEFT LoRA adapter directory")->required();
  cmd->add_option("--out", args->out, "Output directory (must not exist or be empty, unless --force)")->required();
  cmd->add_option("--dtype", args->dtype, "Stored dtype of every float tensor: bf16 (default), f16 or f32")
      ->check(CLI::IsMember({"bf16", "f16", "f32"}));
  cmd->add_option("--shard-size", args->shard_size, "Largest shard, e.g. 5GB (default), 500MB, 2GiB");
  cmd->add_flag("--force", args->force, "Replace an existing output directory");
  cmd->callback([args] { run_merge(*args); });
}

}  // namespace qt::cli
