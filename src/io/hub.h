// Hugging Face Hub models: ids resolved in the local Hub cache, missing files downloaded over HTTPS.
//
// Cache layout (the same as huggingface_hub's, so models downloaded by either tool are shared):
//   <cache>/models--ORG--NAME/refs/<revision>           text file holding the commit sha
//   <cache>/models--ORG--NAME/snapshots/<sha>/<path>    relative symlink to ../../blobs/<etag>
//   <cache>/models--ORG--NAME/blobs/<etag>              the file's bytes (etag = sha256 for LFS files)
//   <cache>/models--ORG--NAME/.no_exist/<sha>/<path>    empty marker: an optional file the repo lacks
//   <cache>/.locks/models--ORG--NAME/<etag>.lock        flock() while a blob is being downloaded
// <cache> = $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
// ~/.cache/huggingface/hub.
//
// A model needs config.json, tokenizer.json and either model.safetensors or
// model.safetensors.index.json plus every shard it lists (generation_config.json and
// tokenizer_config.json are fetched when the repo has them). When every needed file is in the
// snapshot, nothing touches the network. Otherwise the revision is resolved to a commit on the Hub
// ({endpoint}/{repo}/resolve/{revision}/{path}, endpoint = $HF_ENDPOINT or https://huggingface.co)
// and the missing blobs are downloaded: HEAD for metadata, GET into blobs/<etag>.incomplete (resumed
// with Range after a dropped connection), SHA-256 checked for LFS files, renamed, then linked.
// $HF_HUB_OFFLINE=1 forbids the network. The token ($HF_TOKEN, else $HF_TOKEN_PATH, else
// $HF_HOME/token) is sent as "Authorization: Bearer" to the endpoint's host only, never to a
// redirect target on another host (the CDN).
#pragma once
#include <optional>
#include <string>
#include <vector>

namespace qt::hub {

struct HubOptions {
  std::string endpoint;         // "" = $HF_ENDPOINT, else https://huggingface.co
  std::string cache_dir;        // "" = hub_cache_dir()
  std::optional<std::string> token;  // unset = $HF_TOKEN / token file; "" = send no token
  std::optional<bool> offline;  // unset = $HF_HUB_OFFLINE
  bool check_for_updates = false;  // true: ask the Hub for the revision even when the cache is complete
  bool progress = true;         // progress on stderr (a live line on a TTY, one line per file otherwise)
  int max_attempts = 5;         // per request, for transient failures (connection drops, 5xx, 429)
  int retry_base_ms = 1000;     // backoff: base, 2*base, 4*base ... capped at 16*base
  long connect_timeout_s = 15;
  long stall_timeout_s = 60;    // a transfer that moves no byte for this long is retried
};

// "ORG/NAME[@REVISION]" split into its parts; revision defaults to "main".
struct HubRepo {
  std::string repo_id;   // ORG/NAME
  std::string revision;  // a branch/tag name or a 40-hex commit sha
};

// True when s has the shape ORG/NAME[@REV] and is not an existing path (a path that exists wins).
bool looks_like_hub_id(const std::string& s);
// Parses ORG/NAME[@REV]; a bad id is a user error naming the expected shape.
HubRepo parse_hub_id(const std::string& s);

std::string hf_home_dir();    // $HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface
std::string hub_cache_dir();  // see the top of this file
std::string repo_folder_name(const std::string& repo_id);  // models--ORG--NAME

// A local folder or file is returned unchanged. A Hub id is resolved to its snapshot folder in the
// cache, downloading the files the model needs when some are missing (see the top of this file).
std::string resolve_model_dir(const std::string& id_or_path, const HubOptions& opts);

// The snapshot folder of repo in the cache when it holds every file a model needs, else nullopt and
// `missing` lists what is absent (the snapshot itself when the revision is unknown locally).
std::optional<std::string> cached_model_snapshot(const std::string& cache_dir, const HubRepo& repo,
                                                 std::vector<std::string>* missing = nullptr);

// `qwentune download`: fetches the model files (include empty) or every repo file matching one of the
// globs (fnmatch; the repo's file list comes from {endpoint}/api/models/{repo}/revision/{rev}) and
// returns the snapshot folder. Always asks the Hub which commit the revision names.
std::string download_repo(const HubRepo& repo, const std::vector<std::string>& include, const HubOptions& opts);

}  // namespace qt::hub
