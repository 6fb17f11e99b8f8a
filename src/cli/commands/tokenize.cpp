#include "cli/commands/commands.h"
#include "core/error.h"
namespace qt::cli {
void register_tokenize_command(CLI::App& app) {
  auto* t = app.add_subcommand("tokenize", "Encode a JSON array of strings to token ids");
  t->callback([] { qt::fail("tokenize", "not built yet"); });
}
}  // namespace qt::cli
