// qwentune debug grads: forward + backward of a model with a LoRA adapter on one batch.
#include "cli/commands/commands.h"
#include "core/error.h"

namespace qt::cli {
void register_debug_commands(CLI::App& app) {
  auto* debug = app.add_subcommand("debug", "Developer tools");
  debug->require_subcommand(1);
  auto* grads = debug->add_subcommand("grads", "Loss, logits and LoRA gradients for one batch");
  grads->callback([] { qt::fail("debug", "grads: not built yet"); });
}
}  // namespace qt::cli
