// Each CLI command lives in its own file and registers itself on the root CLI::App.
#pragma once
#include <CLI/CLI.hpp>

namespace qt::cli {

void register_debug_commands(CLI::App& app);   // debug grads
void register_tokenize_command(CLI::App& app); // tokenize
void register_bench_command(CLI::App& app);    // bench
void register_merge_command(CLI::App& app);    // merge
void register_convert_lora_command(CLI::App& app);  // convert-lora
void register_data_commands(CLI::App& app);       // data preview
void register_train_command(CLI::App& app);       // train
void register_download_command(CLI::App& app);    // download
void register_generate_command(CLI::App& app);    // generate
void register_eval_command(CLI::App& app);        // eval
void register_init_random_command(CLI::App& app); // init-random
void register_quantize_command(CLI::App& app);    // quantize

}  // namespace qt::cli
