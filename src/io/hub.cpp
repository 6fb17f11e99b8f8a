// Hub ids and the local Hub cache (see hub.h for the layout and the contract). The network side is in
// hub_http.cpp; this file decides which files a model needs, finds them in the cache, and writes
// what is downloaded the way huggingface_hub does (blobs by etag, relative snapshot symlinks, refs).
#include "io/hub.h"

#include <fcntl.h>
#include <fnmatch.h>
#include <pwd.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.h"
#include "io/hub_http.h"

namespace qt::hub {
namespace fs = std::filesystem;
namespace {

constexpr const char* kCtx = "hub";
constexpr const char* kIndex = "model.safetensors.index.json";
constexpr const char* kSingleWeights = "model.safetensors";
const char* const kRequired[] = {"config.json", "tokenizer.json"};
const char* const kOptional[] = {"generation_config.json", "tokenizer_config.json"};

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string home_dir() {
  if (std::string h = env("HOME"); !h.empty()) return h;
  const passwd* pw = ::getpwuid(::getuid());
  return pw && pw->pw_dir ? pw->pw_dir : "/";
}

std::string expand_user(const std::string& p) {
  if (p == "~" || p.rfind("~/", 0) == 0) return home_dir() + p.substr(1);
  return p;
}

bool env_true(const char* name) {
  std::string v = env(name);
  for (char& c : v) c = char(std::toupper(static_cast<unsigned char>(c)));
  return v == "1" || v == "ON" || v == "YES" || v == "TRUE";
}

bool is_commit(const std::string& s) {
  return s.size() == 40 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// The Hub's rule for ORG and NAME: letters, digits, '-', '_', '.'; no "--" or ".."; not starting or
// ending with '-' or '.'.
bool valid_id_part(const std::string& s) {
  if (s.empty() || s.size() > 96) return false;
  for (char c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') return false;
  if (s.find("--") != std::string::npos || s.find("..") != std::string::npos) return false;
  return s.front() != '-' && s.front() != '.' && s.back() != '-' && s.back() != '.';
}

// A relative path with no empty, "." or ".." component: safe to join under a cache folder.
bool safe_relative_path(const std::string& p) {
  if (p.empty() || p.size() > 1024 || p.front() == '/' || p.back() == '/') return false;
  for (char c : p)
    if (static_cast<unsigned char>(c) < 0x20 || c == '\\' || c == 0x7f) return false;
  std::stringstream ss(p);
  for (std::string part; std::getline(ss, part, '/');)
    if (part.empty() || part == "." || part == "..") return false;
  return true;
}

std::optional<HubRepo> try_parse_hub_id(const std::string& s) {
  const size_t at = s.find('@');
  HubRepo r{s.substr(0, at), at == std::string::npos ? "main" : s.substr(at + 1)};
  const size_t slash = r.repo_id.find('/');
  if (slash == std::string::npos || r.repo_id.find('/', slash + 1) != std::string::npos) return std::nullopt;
  if (!valid_id_part(r.repo_id.substr(0, slash)) || !valid_id_part(r.repo_id.substr(slash + 1))) return std::nullopt;
  if (r.revision.size() > 255 || !safe_relative_path(r.revision)) return std::nullopt;
  return r;
}

std::string read_small_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string trimmed(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(0, 1);
  return s;
}

// The commit a revision names in the cache: refs/<revision> when present, else the revision itself
// when it is a commit sha.
std::optional<std::string> cached_commit(const fs::path& repo_dir, const std::string& revision) {
  std::error_code ec;
  const fs::path ref = repo_dir / "refs" / revision;
  if (fs::is_regular_file(ref, ec)) {
    const std::string sha = trimmed(read_small_file(ref));
    if (is_commit(sha)) return sha;
  }
  if (is_commit(revision)) return revision;
  return std::nullopt;
}

// The shard files an index lists (weight_map values), sorted and unique.
std::vector<std::string> index_shards(const fs::path& index_path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_small_file(index_path));
  } catch (const nlohmann::json::exception& e) {
    fail(kCtx, "{}: not valid JSON: {}", index_path.string(), e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail(kCtx, "{}: no \"weight_map\" object", index_path.string());
  std::set<std::string> shards;
  for (const auto& [name, file] : j["weight_map"].items()) {
    if (!file.is_string() || !safe_relative_path(file.get<std::string>()))
      fail(kCtx, "{}: weight_map[\"{}\"] is not a plain relative file name", index_path.string(), name);
    shards.insert(file.get<std::string>());
  }
  if (shards.empty()) fail(kCtx, "{}: the weight_map is empty", index_path.string());
  return {shards.begin(), shards.end()};
}

// The needed files absent from a snapshot folder (optional files never count).
std::vector<std::string> missing_model_files(const fs::path& snap) {
  std::error_code ec;
  std::vector<std::string> missing;
  for (const char* f : kRequired)
    if (!fs::exists(snap / f, ec)) missing.push_back(f);
  if (fs::exists(snap / kIndex, ec)) {
    for (const std::string& shard : index_shards(snap / kIndex))
      if (!fs::exists(snap / shard, ec)) missing.push_back(shard);
  } else if (!fs::exists(snap / kSingleWeights, ec)) {
    missing.push_back(std::string(kSingleWeights) + " (or " + kIndex + " and its shards)");
  }
  return missing;
}

bool is_offline(const HubOptions& opts) { return opts.offline ? *opts.offline : env_true("HF_HUB_OFFLINE"); }

std::string cache_root(const HubOptions& opts) { return opts.cache_dir.empty() ? hub_cache_dir() : opts.cache_dir; }

void write_file_atomically(const fs::path& path, const std::string& text) {
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  const fs::path tmp = path.string() + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    f << text;
    if (!f.flush()) fail(kCtx, "{}: cannot write", tmp.string());
  }
  fs::rename(tmp, path, ec);
  if (ec) fail(kCtx, "{}: cannot rename to {} ({})", tmp.string(), path.string(), ec.message());
}

// Writes one repo's part of the cache: blobs, snapshot links, refs and .no_exist markers.
class CacheWriter {
 public:
  CacheWriter(const std::string& cache, const std::string& repo_id)
      : cache_(cache), folder_(repo_folder_name(repo_id)), repo_dir_(cache_ / folder_) {}

  const fs::path& repo_dir() const { return repo_dir_; }
  fs::path blob(const std::string& etag) const { return repo_dir_ / "blobs" / etag; }
  fs::path snapshot(const std::string& commit) const { return repo_dir_ / "snapshots" / commit; }

  void write_ref(const std::string& revision, const std::string& commit) {
    if (revision == commit) return;
    const fs::path ref = repo_dir_ / "refs" / revision;
    std::error_code ec;
    if (fs::is_regular_file(ref, ec) && trimmed(read_small_file(ref)) == commit) return;
    write_file_atomically(ref, commit);
  }

  void mark_missing(const std::string& commit, const std::string& path) {
    const fs::path marker = repo_dir_ / ".no_exist" / commit / path;
    std::error_code ec;
    if (!fs::exists(marker, ec)) write_file_atomically(marker, "");
  }

  bool has_blob(const std::string& etag) const {
    std::error_code ec;
    return fs::is_regular_file(blob(etag), ec);
  }

  // Downloads the blob unless present (under a per-blob lock), then links snapshots/<t.revision>/<path>.
  void fetch(HubClient& client, const FileTarget& t, const FileMeta& meta, bool progress) {
    std::error_code ec;
    fs::create_directories(repo_dir_ / "blobs", ec);
    if (ec) fail(kCtx, "{}: cannot create ({})", (repo_dir_ / "blobs").string(), ec.message());
    if (!has_blob(meta.etag)) {
      const fs::path lock_path = cache_ / ".locks" / folder_ / (meta.etag + ".lock");
      fs::create_directories(lock_path.parent_path(), ec);
      const int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
      if (lock < 0) fail(kCtx, "{}: cannot create ({})", lock_path.string(), std::strerror(errno));
      struct LockGuard {
        int fd;
        ~LockGuard() { ::close(fd); }  // closing releases the flock
      } guard{lock};
      if (::flock(lock, LOCK_EX | LOCK_NB) != 0) {
        if (progress) std::fprintf(stderr, "%s: waiting for another download of it to finish\n", t.path.c_str());
        if (::flock(lock, LOCK_EX) != 0) fail(kCtx, "{}: cannot lock ({})", lock_path.string(), std::strerror(errno));
      }
      if (!has_blob(meta.etag)) {  // another process may have finished it while we waited
        const std::string partial = blob(meta.etag).string() + ".incomplete";
        client.download(meta, t, partial);
        fs::rename(partial, blob(meta.etag), ec);
        if (ec) fail(kCtx, "{}: cannot rename to {} ({})", partial, blob(meta.etag).string(), ec.message());
      }
    }
    link(t.revision, t.path, meta.etag);  // t.revision is the commit: every file is fetched by commit
  }

  // snapshots/<commit>/<path> -> ../../blobs/<etag> (one more "../" per folder in path), atomically.
  void link(const std::string& commit, const std::string& path, const std::string& etag) {
    const fs::path dst = snapshot(commit) / path;
    std::string target;
    for (size_t i = 0, depth = size_t(std::count(path.begin(), path.end(), '/')) + 2; i < depth; ++i) target += "../";
    target += "blobs/" + etag;
    std::error_code ec;
    fs::create_directories(dst.parent_path(), ec);
    if (ec) fail(kCtx, "{}: cannot create ({})", dst.parent_path().string(), ec.message());
    if (fs::is_symlink(dst, ec) && fs::read_symlink(dst, ec) == fs::path(target)) return;
    if (!fs::is_symlink(dst, ec) && fs::exists(dst, ec)) return;  // a real file put there by hand: keep it
    const fs::path tmp = dst.string() + ".tmp." + std::to_string(::getpid());
    fs::remove(tmp, ec);
    fs::create_symlink(target, tmp, ec);
    if (ec) fail(kCtx, "{}: cannot create a symlink ({})", dst.string(), ec.message());
    fs::rename(tmp, dst, ec);
    if (ec) fail(kCtx, "{}: cannot rename to {} ({})", tmp.string(), dst.string(), ec.message());
  }

 private:
  fs::path cache_;
  std::string folder_;
  fs::path repo_dir_;
};

struct PlannedFile {
  FileTarget target;
  FileMeta meta;
};

// Fails early, before any byte is written, when the blobs still missing cannot fit on the disk.
void check_disk_space(const CacheWriter& cw, const std::vector<PlannedFile>& plan) {
  uint64_t need = 0;
  for (const PlannedFile& f : plan) {
    if (cw.has_blob(f.meta.etag) || f.meta.size < 0) continue;
    std::error_code ec;
    const uintmax_t partial = fs::file_size(cw.blob(f.meta.etag).string() + ".incomplete", ec);
    need += uint64_t(f.meta.size) - std::min<uint64_t>(ec ? 0 : partial, uint64_t(f.meta.size));
  }
  struct statvfs vfs {};
  const fs::path blobs = cw.repo_dir() / "blobs";
  if (need == 0 || ::statvfs(blobs.c_str(), &vfs) != 0) return;
  const uint64_t free_bytes = uint64_t(vfs.f_bavail) * vfs.f_frsize;
  if (free_bytes < need)
    fail(kCtx, "disk full: the download needs {:.2f} GB more in {}, only {:.2f} GB are free", need / 1e9,
         blobs.string(), free_bytes / 1e9);
}

// Downloads what the plan lacks and links everything; returns the snapshot folder.
std::string fetch_plan(HubClient& client, CacheWriter& cw, const std::string& commit,
                       const std::vector<PlannedFile>& plan, const HubOptions& opts) {
  std::error_code ec;
  fs::create_directories(cw.repo_dir() / "blobs", ec);
  check_disk_space(cw, plan);
  for (const PlannedFile& f : plan) cw.fetch(client, f.target, f.meta, opts.progress);
  fs::create_directories(cw.snapshot(commit), ec);
  return cw.snapshot(commit).string();
}

// Online: resolves the revision to a commit, then fetches every file the model needs at that commit.
std::string sync_model_files(const HubRepo& repo, const HubOptions& opts) {
  HubClient client(opts);
  CacheWriter cw(cache_root(opts), repo.repo_id);
  const FileMeta config = *client.file_meta({repo.repo_id, repo.revision, "config.json"}, false);
  const std::string commit = config.commit;
  cw.write_ref(repo.revision, commit);
  auto at = [&](const std::string& path) { return FileTarget{repo.repo_id, commit, path}; };
  std::vector<PlannedFile> plan{{at("config.json"), config}};
  for (const char* f : kRequired)
    if (plan.front().target.path != f) plan.push_back({at(f), *client.file_meta(at(f), false)});
  for (const char* f : kOptional) {
    if (auto meta = client.file_meta(at(f), true)) plan.push_back({at(f), *meta});
    else cw.mark_missing(commit, f);
  }
  if (auto index = client.file_meta(at(kIndex), true)) {
    cw.fetch(client, at(kIndex), *index, opts.progress);
    for (const std::string& shard : index_shards(cw.snapshot(commit) / kIndex))
      plan.push_back({at(shard), *client.file_meta(at(shard), false)});
  } else {
    plan.push_back({at(kSingleWeights), *client.file_meta(at(kSingleWeights), false)});
  }
  return fetch_plan(client, cw, commit, plan, opts);
}

// Online: the repo's files matching one of the globs, at the commit the revision names.
std::string sync_matching_files(const HubRepo& repo, const std::vector<std::string>& include, const HubOptions& opts) {
  HubClient client(opts);
  CacheWriter cw(cache_root(opts), repo.repo_id);
  const FileTarget listing{repo.repo_id, repo.revision, "(file list)"};
  const std::string url =
      fmt::format("{}/api/models/{}/revision/{}", client.endpoint(), repo.repo_id, url_encode(repo.revision, false));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(client.get_text(url, listing));
  } catch (const nlohmann::json::exception& e) {
    fail(kCtx, "{}: not valid JSON: {}", url, e.what());
  }
  if (!j.is_object() || !j.contains("sha") || !j["sha"].is_string() || !is_commit(j["sha"].get<std::string>()) ||
      !j.contains("siblings") || !j["siblings"].is_array())
    fail(kCtx, "{}: the answer has no commit \"sha\" and \"siblings\" list", url);
  const std::string commit = j["sha"].get<std::string>();
  cw.write_ref(repo.revision, commit);
  std::vector<PlannedFile> plan;
  for (const auto& s : j["siblings"]) {
    if (!s.is_object() || !s.contains("rfilename") || !s["rfilename"].is_string()) continue;
    const std::string name = s["rfilename"].get<std::string>();
    if (!safe_relative_path(name)) fail(kCtx, "{}: unsafe file name '{}' in the listing", url, name);
    const bool wanted = std::any_of(include.begin(), include.end(),
                                    [&](const std::string& g) { return ::fnmatch(g.c_str(), name.c_str(), 0) == 0; });
    if (!wanted) continue;
    const FileTarget t{repo.repo_id, commit, name};
    plan.push_back({t, *client.file_meta(t, false)});
  }
  if (plan.empty())
    fail(kCtx, "no file of {}@{} matches --include {}", repo.repo_id, repo.revision, fmt::join(include, " "));
  return fetch_plan(client, cw, commit, plan, opts);
}

}  // namespace

bool looks_like_hub_id(const std::string& s) {
  std::error_code ec;
  return !fs::exists(s, ec) && try_parse_hub_id(s).has_value();
}

HubRepo parse_hub_id(const std::string& s) {
  auto r = try_parse_hub_id(s);
  if (!r)
    fail(kCtx, "'{}' is not a Hub model id: expected ORG/NAME or ORG/NAME@REVISION (letters, digits, '-', '_', '.')",
         s);
  return *r;
}

std::string hf_home_dir() {
  if (std::string h = env("HF_HOME"); !h.empty()) return expand_user(h);
  if (std::string x = env("XDG_CACHE_HOME"); !x.empty()) return expand_user(x) + "/huggingface";
  return home_dir() + "/.cache/huggingface";
}

std::string hub_cache_dir() {
  for (const char* name : {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"})
    if (std::string c = env(name); !c.empty()) return expand_user(c);
  return hf_home_dir() + "/hub";
}

std::string repo_folder_name(const std::string& repo_id) {
  std::string f = "models--" + repo_id;
  for (size_t p = 0; (p = f.find('/', p)) != std::string::npos;) f.replace(p, 1, "--");
  return f;
}

std::optional<std::string> cached_model_snapshot(const std::string& cache_dir, const HubRepo& repo,
                                                 std::vector<std::string>* missing) {
  const fs::path repo_dir = fs::path(cache_dir) / repo_folder_name(repo.repo_id);
  std::vector<std::string> absent;
  const auto commit = cached_commit(repo_dir, repo.revision);
  std::error_code ec;
  if (!commit || !fs::is_directory(repo_dir / "snapshots" / *commit, ec)) {
    absent.push_back(fmt::format("the snapshot of revision '{}' ({} has no refs/{} or snapshot)", repo.revision,
                                 repo_dir.string(), repo.revision));
  } else {
    absent = missing_model_files(repo_dir / "snapshots" / *commit);
  }
  if (missing) *missing = absent;
  if (!absent.empty()) return std::nullopt;
  return (repo_dir / "snapshots" / *commit).string();
}

namespace {

// The cache's snapshot when complete (and no update check is asked for), else the Hub's.
std::string resolve_repo(const HubRepo& repo, const HubOptions& opts) {
  const bool offline = is_offline(opts);
  std::vector<std::string> missing;
  if (!opts.check_for_updates || offline)
    if (auto snap = cached_model_snapshot(cache_root(opts), repo, &missing)) return *snap;
  if (offline)
    fail(kCtx, "{}@{} is not complete in the local cache {} and offline mode (HF_HUB_OFFLINE) forbids downloading; "
         "missing: {}", repo.repo_id, repo.revision, cache_root(opts), fmt::join(missing, ", "));
  return sync_model_files(repo, opts);
}

}  // namespace

std::string resolve_model_dir(const std::string& id_or_path, const HubOptions& opts) {
  std::error_code ec;
  if (fs::exists(id_or_path, ec)) return id_or_path;
  const auto repo = try_parse_hub_id(id_or_path);
  if (!repo)
    fail(kCtx, "{}: no such file or folder, and not a Hub model id (ORG/NAME or ORG/NAME@REVISION)", id_or_path);
  return resolve_repo(*repo, opts);
}

std::string download_repo(const HubRepo& repo, const std::vector<std::string>& include, const HubOptions& opts) {
  if (include.empty()) {
    HubOptions o = opts;
    o.check_for_updates = true;
    return resolve_repo(repo, o);
  }
  if (is_offline(opts)) fail(kCtx, "download --include needs the network, and offline mode (HF_HUB_OFFLINE) is set");
  return sync_matching_files(repo, include, opts);
}

}  // namespace qt::hub
