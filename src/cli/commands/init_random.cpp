// `qwentune init-random --config C --out DIR [--seed S]`: a model folder holding the random weights
// that `train` (and generate/eval) use for a bare config.json with the same seed: DIR/config.json
// (a copy of C), DIR/model.safetensors (f32, Hub tensor names) and the tokenizer files that
// load_model_source picks for C. The folder is what `merge` needs as its base model.
#include <filesystem>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_source.h"

namespace qt::cli {

namespace {

namespace fs = std::filesystem;

struct InitRandomArgs {
  std::string config, out;
  uint64_t seed = 42;
  bool force = false;
};

void run_init_random(const InitRandomArgs& a) {
  std::error_code ec;
  if (!fs::is_regular_file(a.config, ec)) fail("init-random", "--config {}: no such file", a.config);
  if (fs::exists(a.out, ec) && !(fs::is_directory(a.out, ec) && fs::is_empty(a.out, ec)) && !a.force)
    fail("init-random", "--out {} exists and is not an empty folder (use --force to write into it)", a.out);
  const LoadedModel m = load_model_source(a.config, a.seed, "init-random");
  fs::create_directories(a.out, ec);
  if (ec) fail("init-random", "--out {}: cannot create it: {}", a.out, ec.message());
  const fs::path out(a.out);
  write_safetensors((out / "model.safetensors").string(), hub_named_tensors(m.weights), {{"format", "pt"}});
  fs::copy_file(a.config, out / "config.json", fs::copy_options::overwrite_existing, ec);
  if (ec) fail("init-random", "cannot write {}: {}", (out / "config.json").string(), ec.message());
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    const fs::path src = fs::path(m.tokenizer_path) / f;
    if (fs::exists(src)) fs::copy_file(src, out / f, fs::copy_options::overwrite_existing, ec);
    if (ec) fail("init-random", "cannot write {}: {}", (out / f).string(), ec.message());
  }
  fmt::print("wrote {}: random weights of {} (seed {}), tokenizer from {}\n", a.out, a.config, a.seed,
             m.tokenizer_path);
}

}  // namespace

void register_init_random_command(CLI::App& app) {
  auto a = std::make_shared<InitRandomArgs>();
  auto* c = app.add_subcommand("init-random",
                               "Write a model folder with the random weights train uses for a bare config.json");
  c->add_option("--config", a->config, "HF config.json (qwen2, qwen3 or qwen3_moe)")->required();
  c->add_option("--out", a->out, "Output folder (must not exist or be empty, unless --force)")->required();
  c->add_option("--seed", a->seed, "Seed of the weights (default 42, train's default seed)");
  c->add_flag("--force", a->force, "Write into an existing folder");
  c->callback([a] { run_init_random(*a); });
}

}  // namespace qt::cli
