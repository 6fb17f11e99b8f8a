// qwentune command-line entry point. User errors (qt::Error) print as one line and exit 1;
// invariant failures abort with file:line (see core/error.h).
#include <cstdio>
#include <exception>

#include "cli/commands/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"qwentune: LoRA and QLoRA fine-tuning of Qwen2, Qwen3 and Qwen3-MoE models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "qwentune 0.1.0");
  qt::cli::register_debug_commands(app);
  qt::cli::register_tokenize_command(app);
  qt::cli::register_bench_command(app);
  qt::cli::register_merge_command(app);
  qt::cli::register_convert_lora_command(app);
  qt::cli::register_data_commands(app);
  qt::cli::register_train_command(app);
  qt::cli::register_download_command(app);
  qt::cli::register_generate_command(app);
  qt::cli::register_eval_command(app);
  qt::cli::register_init_random_command(app);
  qt::cli::register_quantize_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const qt::Error& e) {
    std::fprintf(stderr, "qwentune: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "qwentune: error: out of memory\n");
    return 1;
  }
  return 0;
}
