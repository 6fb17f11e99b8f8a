// `qwentune download ORG/NAME[@REV] [--revision R] [--include GLOB...] [--cache-dir DIR] [--quiet]`:
// fetches a model from the Hugging Face Hub into the local Hub cache (the layout huggingface_hub
// uses, see io/hub.h) and prints its snapshot folder on stdout. Without --include it fetches what
// a model needs (config, tokenizer, weights and their shards); with it, every repo file matching one
// of the globs. Files already in the cache are not downloaded again; an interrupted download resumes.
#include <cstdio>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/hub.h"

namespace qt::cli {

namespace {
struct DownloadArgs {
  std::string id, revision, cache_dir;
  std::vector<std::string> include;
  bool quiet = false;
};
}  // namespace

void register_download_command(CLI::App& app) {
  auto a = std::make_shared<DownloadArgs>();
  auto* c = app.add_subcommand("download", "Fetch a model from the Hugging Face Hub into the local cache");
  c->add_option("model", a->id, "Hub model id ORG/NAME or ORG/NAME@REVISION")->required();
  c->add_option("--revision", a->revision, "branch, tag or commit sha (default: main)");
  c->add_option("--include", a->include, "only the repo files matching these globs (fnmatch)");
  c->add_option("--cache-dir", a->cache_dir, "Hub cache folder (default: $HF_HUB_CACHE or $HF_HOME/hub)");
  c->add_flag("--quiet", a->quiet, "no progress on stderr");
  c->footer("\nEnvironment: HF_ENDPOINT, HF_TOKEN (or HF_TOKEN_PATH, $HF_HOME/token), HF_HOME, HF_HUB_CACHE, "
            "HF_HUB_OFFLINE.");
  c->callback([a] {
    hub::HubRepo repo = hub::parse_hub_id(a->id);
    if (!a->revision.empty()) {
      if (a->id.find('@') != std::string::npos && repo.revision != a->revision)
        fail("download", "revision given twice: '{}' in the id and --revision {}", repo.revision, a->revision);
      repo = hub::parse_hub_id(repo.repo_id + "@" + a->revision);
    }
    hub::HubOptions opts;
    opts.cache_dir = a->cache_dir;
    opts.progress = !a->quiet;
    std::printf("%s\n", hub::download_repo(repo, a->include, opts).c_str());
  });
}

}  // namespace qt::cli
