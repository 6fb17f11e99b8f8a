// Each CLI command lives in its own file and registers itself on the root CLI::App.
#pragma once
#include <CLI/CLI.hpp>

namespace qt::cli {

void register_debug_commands(CLI::App& app);   // debug grads
void register_tokenize_command(CLI::App& app); // tokenize

}  // namespace qt::cli
