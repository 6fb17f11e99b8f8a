// Hub ids and the Hub cache (io/hub.h): cache-root precedence, id parsing, resolution in a fake
// cache tree built here (refs, commit revisions, shards, missing files, offline), and downloads from
// a loopback server with the Hub's URL layout (fake_hub_server.h): the resulting cache layout,
// resume after a dropped connection, a server that ignores Range, checksum mismatch, tokens (and
// that the CDN never sees them), 404s, renamed repos, --include, network failure, and `qwentune download`.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "fake_hub_server.h"
#include "io/hub.h"
#include "test_files.h"

namespace fs = std::filesystem;
using namespace qt::hub;
using qt::test::FakeHub;

namespace {

using qt::test::TempDir;
using qt::test::read_file;

// Sets (or unsets, with nullopt) environment variables for one scope.
class ScopedEnv {
 public:
  ScopedEnv() = default;
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  ScopedEnv& set(const char* name, std::optional<std::string> value) {
    const char* old = std::getenv(name);
    saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
    if (value) ::setenv(name, value->c_str(), 1);
    else ::unsetenv(name);
    return *this;
  }
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second) ::setenv(it->first.c_str(), it->second->c_str(), 1);
      else ::unsetenv(it->first.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

// Every variable the Hub code reads, cleared for one scope, so the developer's own settings cannot leak in.
struct CleanHubEnv : ScopedEnv {
  CleanHubEnv() {
    for (const char* v : {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_ENDPOINT",
                          "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE"})
      set(v, std::nullopt);
  }
};

void write_file(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << s;
}

std::string random_bytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = char(rng() & 0xff);
  return s;
}

std::string expect_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const qt::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no qt::Error thrown";
  return "";
}

const std::string kCommit = "0123456789abcdef0123456789abcdef01234567";
const std::string kShard1 = "model-00001-of-00002.safetensors";
const std::string kShard2 = "model-00002-of-00002.safetensors";

std::string index_json() {
  return R"({"metadata": {}, "weight_map": {"a.weight": ")" + kShard1 + R"(", "b.weight": ")" + kShard2 +
         R"(", "c.weight": ")" + kShard1 + R"("}})";
}

// The files of a sharded model repo, as the fake server serves them.
std::map<std::string, FakeHub::File> sharded_repo() {
  return {{"config.json", {R"({"model_type": "qwen3"})", false}},
          {"tokenizer.json", {R"({"model": {"type": "BPE"}})", false}},
          {"tokenizer_config.json", {R"({"chat_template": "x"})", false}},
          {"README.md", {"# model card", false}},
          {"model.safetensors.index.json", {index_json(), false}},
          {kShard1, {random_bytes(300000, 1), true}},
          {kShard2, {random_bytes(70000, 2), true}}};
}

// A cache entry laid out as huggingface_hub writes it: blob by etag, relative snapshot symlink.
void put_cached_file(const fs::path& repo_dir, const std::string& commit, const std::string& path,
                     const std::string& content) {
  const std::string etag = qt::sha256_hex(content);
  write_file(repo_dir / "blobs" / etag, content);
  const fs::path link = repo_dir / "snapshots" / commit / path;
  fs::create_directories(link.parent_path());
  std::error_code ec;
  fs::remove(link, ec);
  fs::create_symlink("../../blobs/" + etag, link);
}

void put_cached_repo(const fs::path& cache, const std::string& repo_id, const std::string& commit,
                     const std::map<std::string, FakeHub::File>& files, const std::string& ref = "main") {
  const fs::path repo_dir = cache / repo_folder_name(repo_id);
  for (const auto& [path, f] : files) put_cached_file(repo_dir, commit, path, f.content);
  if (!ref.empty()) write_file(repo_dir / "refs" / ref, commit);
}

HubOptions server_options(const FakeHub& hub, const fs::path& cache) {
  HubOptions o;
  o.endpoint = hub.url();
  o.cache_dir = cache.string();
  o.token = "";
  o.offline = false;
  o.retry_base_ms = 5;
  o.progress = false;
  return o;
}

size_t count_requests(const FakeHub& hub, const std::string& method, const std::string& target_prefix) {
  size_t n = 0;
  for (const auto& r : hub.requests()) n += r.method == method && r.target.rfind(target_prefix, 0) == 0;
  return n;
}

}  // namespace

TEST(HubCacheDir, EnvironmentPrecedence) {
  CleanHubEnv env;
  env.set("HOME", "/home/u");
  EXPECT_EQ(hf_home_dir(), "/home/u/.cache/huggingface");
  EXPECT_EQ(hub_cache_dir(), "/home/u/.cache/huggingface/hub");
  env.set("XDG_CACHE_HOME", "/xdg");
  EXPECT_EQ(hub_cache_dir(), "/xdg/huggingface/hub");
  env.set("HF_HOME", "~/hf");
  EXPECT_EQ(hf_home_dir(), "/home/u/hf");
  EXPECT_EQ(hub_cache_dir(), "/home/u/hf/hub");
  env.set("HF_HUB_CACHE", "/fast/hub");
  EXPECT_EQ(hub_cache_dir(), "/fast/hub");
  EXPECT_EQ(hf_home_dir(), "/home/u/hf");
}

TEST(HubId, ParseAndRecognise) {
  EXPECT_EQ(repo_folder_name("Qwen/Qwen3-30B-A3B"), "models--Qwen--Qwen3-30B-A3B");
  const HubRepo a = parse_hub_id("Qwen/Qwen3-30B-A3B");
  EXPECT_EQ(a.repo_id, "Qwen/Qwen3-30B-A3B");
  EXPECT_EQ(a.revision, "main");
  const HubRepo b = parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct@" + kCommit);
  EXPECT_EQ(b.repo_id, "Qwen/Qwen2.5-0.5B-Instruct");
  EXPECT_EQ(b.revision, kCommit);
  EXPECT_EQ(parse_hub_id("org/name@refs/pr/1").revision, "refs/pr/1");
  EXPECT_TRUE(looks_like_hub_id("Qwen/Qwen3-0.6B"));
  for (const char* bad : {"Qwen3-0.6B", "/abs/Qwen/x", "./Qwen/x", "a/b/c", "org/..", "org/na me", "org/-x",
                          "org/x@", "org/x@../../etc", "org/x@/abs", "~/models/x", "org--a/b"}) {
    EXPECT_FALSE(looks_like_hub_id(bad)) << bad;
    EXPECT_NE(expect_error([&] { parse_hub_id(bad); }).find("ORG/NAME"), std::string::npos) << bad;
  }
}

TEST(HubId, ExistingPathWinsAndIsReturnedUnchanged) {
  CleanHubEnv env;
  TempDir tmp;
  const fs::path cwd = fs::current_path();
  fs::create_directories(tmp.path / "Org" / "Model");
  fs::current_path(tmp.path);
  EXPECT_FALSE(looks_like_hub_id("Org/Model"));
  HubOptions o;
  o.offline = true;
  EXPECT_EQ(resolve_model_dir("Org/Model", o), "Org/Model");
  fs::current_path(cwd);
  EXPECT_EQ(resolve_model_dir((tmp.path / "Org").string(), o), (tmp.path / "Org").string());
  const std::string err = expect_error([&] { resolve_model_dir((tmp.path / "nope").string(), o); });
  EXPECT_NE(err.find("no such file or folder, and not a Hub model id"), std::string::npos) << err;
}

TEST(HubCache, ResolvesRefsAndCommitRevisionsOffline) {
  CleanHubEnv env;
  TempDir tmp;
  const fs::path cache = tmp.path / "hf" / "hub";
  put_cached_repo(cache, "Org/Model", kCommit, sharded_repo());
  const std::string other = "fedcba9876543210fedcba9876543210fedcba98";
  put_cached_repo(cache, "Org/Model", other, sharded_repo(), "");  // an older snapshot, no ref
  const std::string snap = (cache / "models--Org--Model" / "snapshots" / kCommit).string();

  env.set("HF_HOME", (tmp.path / "hf").string()).set("HF_HUB_OFFLINE", "1");
  HubOptions o;  // everything from the environment
  EXPECT_EQ(resolve_model_dir("Org/Model", o), snap);
  EXPECT_EQ(resolve_model_dir("Org/Model@main", o), snap);
  EXPECT_EQ(resolve_model_dir("Org/Model@" + other, o),
            (cache / "models--Org--Model" / "snapshots" / other).string());
  EXPECT_EQ(read_file(fs::path(snap) / kShard2), sharded_repo()[kShard2].content);

  // HF_HUB_CACHE wins over HF_HOME: an empty cache there means the model is not found.
  env.set("HF_HUB_CACHE", (tmp.path / "elsewhere").string());
  const std::string err = expect_error([&] { resolve_model_dir("Org/Model", o); });
  EXPECT_NE(err.find("HF_HUB_OFFLINE"), std::string::npos) << err;
  EXPECT_NE(err.find("has no refs/main"), std::string::npos) << err;
}

TEST(HubCache, ListsMissingFilesAndShards) {
  CleanHubEnv env;
  TempDir tmp;
  const fs::path cache = tmp.path / "hub";
  auto files = sharded_repo();
  files.erase(kShard2);
  files.erase("tokenizer.json");
  put_cached_repo(cache, "Org/Model", kCommit, files);
  std::vector<std::string> missing;
  EXPECT_FALSE(cached_model_snapshot(cache.string(), {"Org/Model", "main"}, &missing));
  EXPECT_EQ(missing, (std::vector<std::string>{"tokenizer.json", kShard2}));

  HubOptions o;
  o.cache_dir = cache.string();
  o.offline = true;
  const std::string err = expect_error([&] { resolve_model_dir("Org/Model", o); });
  EXPECT_NE(err.find("missing: tokenizer.json, " + kShard2), std::string::npos) << err;

  // A dangling snapshot link (its blob deleted) counts as missing.
  put_cached_file(cache / "models--Org--Model", kCommit, "tokenizer.json", "{}");
  put_cached_file(cache / "models--Org--Model", kCommit, kShard2, "x");
  EXPECT_TRUE(cached_model_snapshot(cache.string(), {"Org/Model", "main"}));
  fs::remove(cache / "models--Org--Model" / "blobs" / qt::sha256_hex("x"));
  EXPECT_FALSE(cached_model_snapshot(cache.string(), {"Org/Model", "main"}, &missing));
  EXPECT_EQ(missing, std::vector<std::string>{kShard2});

  // Single-file weights: model.safetensors instead of the index.
  put_cached_repo(cache, "Org/Small", kCommit,
                  {{"config.json", {"{}", false}}, {"tokenizer.json", {"{}", false}}, {"model.safetensors", {"w", true}}});
  EXPECT_TRUE(cached_model_snapshot(cache.string(), {"Org/Small", "main"}));
  fs::remove(cache / "models--Org--Small" / "snapshots" / kCommit / "model.safetensors");
  EXPECT_FALSE(cached_model_snapshot(cache.string(), {"Org/Small", "main"}, &missing));
  ASSERT_EQ(missing.size(), 1u);
  EXPECT_NE(missing[0].find("model.safetensors (or model.safetensors.index.json"), std::string::npos);
}

// A loopback Hub serving sharded_repo(), an empty cache folder, and a clean environment.
class HubDownload : public ::testing::Test {
 protected:
  void SetUp() override { hub.files = sharded_repo(); }
  CleanHubEnv env;
  TempDir tmp;
  FakeHub hub;
};

TEST_F(HubDownload, LaysOutTheCacheLikeHuggingfaceHubAndThenNeedsNoNetwork) {
  HubOptions o = server_options(hub, tmp.path);
  const std::string snap = resolve_model_dir("Org/Model", o);
  const fs::path repo_dir = tmp.path / "models--Org--Model";
  EXPECT_EQ(snap, (repo_dir / "snapshots" / kCommit).string());
  EXPECT_EQ(read_file(repo_dir / "refs" / "main"), kCommit);
  for (const char* f : {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json",
                        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    const fs::path link = fs::path(snap) / f;
    ASSERT_TRUE(fs::is_symlink(link)) << f;
    const std::string sha = qt::sha256_hex(hub.files[f].content);
    const std::string etag = hub.files[f].lfs ? sha : sha.substr(0, 40);  // LFS: the sha256; else the git etag
    EXPECT_EQ(fs::read_symlink(link), fs::path("../../blobs/" + etag)) << f;
    EXPECT_EQ(read_file(link), hub.files[f].content) << f;
  }
  EXPECT_FALSE(fs::exists(fs::path(snap) / "README.md"));  // not a model file
  EXPECT_TRUE(fs::exists(repo_dir / ".no_exist" / kCommit / "generation_config.json"));
  EXPECT_FALSE(fs::exists(tmp.path / "models--Org--Model" / "blobs" / (qt::sha256_hex(hub.files[kShard1].content) + ".incomplete")));
  EXPECT_EQ(count_requests(hub, "GET", "/cdn/"), 2u);

  // Complete in the cache: a second resolve makes no request at all.
  const size_t before = hub.request_count();
  EXPECT_EQ(resolve_model_dir("Org/Model", o), snap);
  EXPECT_EQ(hub.request_count(), before);
  // An update check asks for metadata only: every blob is already there.
  o.check_for_updates = true;
  EXPECT_EQ(resolve_model_dir("Org/Model", o), snap);
  EXPECT_GT(hub.request_count(), before);
  EXPECT_EQ(count_requests(hub, "GET", "/"), 6u);  // 4 small files + 2 shards, all from the first resolve
}

TEST_F(HubDownload, ResumesWithRangeAfterADroppedConnection) {
  hub.drop_once = {kShard1};
  HubOptions o = server_options(hub, tmp.path);
  o.progress = true;  // exercises the retry message and the per-file lines
  const std::string snap = resolve_model_dir("Org/Model", o);
  EXPECT_EQ(read_file(fs::path(snap) / kShard1), hub.files[kShard1].content);
  const std::string cdn = "/cdn/" + qt::sha256_hex(hub.files[kShard1].content);
  std::vector<std::string> ranges;
  for (const auto& r : hub.requests())
    if (r.method == "GET" && r.target == cdn) ranges.push_back(r.headers.count("range") ? r.headers.at("range") : "");
  EXPECT_EQ(ranges, (std::vector<std::string>{"", "bytes=150000-"}));
}

TEST_F(HubDownload, ResumesAPartialFileAndRestartsWhenRangeIsIgnored) {
  const std::string& content = hub.files[kShard1].content;
  const fs::path blobs = tmp.path / "models--Org--Model" / "blobs";
  const fs::path partial = blobs / (qt::sha256_hex(content) + ".incomplete");
  write_file(partial, content.substr(0, 1000));  // left by an interrupted run
  HubOptions o = server_options(hub, tmp.path);
  std::string snap = resolve_model_dir("Org/Model", o);
  EXPECT_EQ(read_file(fs::path(snap) / kShard1), content);
  const std::string cdn = "/cdn/" + qt::sha256_hex(content);
  ASSERT_EQ(count_requests(hub, "GET", cdn), 1u);
  for (const auto& r : hub.requests())
    if (r.target == cdn) {
      EXPECT_EQ(r.headers.at("range"), "bytes=1000-");
    }

  // A server that answers 200 to a Range request: the partial bytes are replaced, not duplicated.
  TempDir tmp2;
  hub.ignore_range = {kShard1};
  write_file(tmp2.path / "models--Org--Model" / "blobs" / (qt::sha256_hex(content) + ".incomplete"),
             content.substr(0, 1000));
  snap = resolve_model_dir("Org/Model", server_options(hub, tmp2.path));
  EXPECT_EQ(read_file(fs::path(snap) / kShard1), content);
}

TEST_F(HubDownload, AnExpiredCdnUrlIsRefreshedOnce) {
  hub.expire_once = {kShard2};
  const std::string snap = resolve_model_dir("Org/Model", server_options(hub, tmp.path));
  EXPECT_EQ(read_file(fs::path(snap) / kShard2), hub.files[kShard2].content);
  const std::string head = "/Org/Model/resolve/" + kCommit + "/" + kShard2;
  EXPECT_EQ(count_requests(hub, "HEAD", head), 2u);  // the second HEAD fetched a fresh URL
  EXPECT_EQ(count_requests(hub, "GET", "/cdn/" + qt::sha256_hex(hub.files[kShard2].content)), 2u);
}

TEST_F(HubDownload, ChecksumMismatchLeavesNoBlobAndNoLink) {
  hub.corrupt = {kShard2};
  const std::string err = expect_error([&] { resolve_model_dir("Org/Model", server_options(hub, tmp.path)); });
  EXPECT_NE(err.find("checksum mismatch"), std::string::npos) << err;
  EXPECT_NE(err.find(kShard2), std::string::npos) << err;
  const fs::path repo_dir = tmp.path / "models--Org--Model";
  const std::string etag = qt::sha256_hex(hub.files[kShard2].content);
  EXPECT_FALSE(fs::exists(repo_dir / "blobs" / etag));
  EXPECT_FALSE(fs::exists(repo_dir / "blobs" / (etag + ".incomplete")));
  EXPECT_FALSE(fs::is_symlink(repo_dir / "snapshots" / kCommit / kShard2));
  // The next run, against a healthy server, completes the model.
  hub.corrupt.clear();
  EXPECT_EQ(read_file(fs::path(resolve_model_dir("Org/Model", server_options(hub, tmp.path))) / kShard2),
            hub.files[kShard2].content);
}

TEST_F(HubDownload, TokenGoesToTheHubButNeverToTheCdn) {
  FakeHub cdn;
  cdn.files = hub.files;
  hub.cdn_base = cdn.url();
  hub.required_token = "hf_secret";
  hub.get_redirect = {"tokenizer.json"};  // a GET redirected to another host by libcurl itself
  HubOptions o = server_options(hub, tmp.path);
  std::string err = expect_error([&] { resolve_model_dir("Org/Model", o); });
  EXPECT_NE(err.find("HTTP 401"), std::string::npos) << err;
  EXPECT_NE(err.find("HF_TOKEN"), std::string::npos) << err;
  EXPECT_NE(err.find("no token was sent"), std::string::npos) << err;
  o.token = "wrong";
  err = expect_error([&] { resolve_model_dir("Org/Model", o); });
  EXPECT_NE(err.find("the token sent was refused"), std::string::npos) << err;

  // The token from the environment, then from the token file.
  o.token.reset();
  env.set("HF_TOKEN", "hf_secret");
  const std::string snap = resolve_model_dir("Org/Model", o);
  EXPECT_EQ(read_file(fs::path(snap) / "tokenizer.json"), hub.files["tokenizer.json"].content);
  EXPECT_EQ(read_file(fs::path(snap) / kShard1), hub.files[kShard1].content);
  EXPECT_EQ(count_requests(cdn, "GET", "/cdn/"), 3u);  // two shards + the redirected tokenizer.json
  for (const auto& r : cdn.requests()) EXPECT_EQ(r.headers.count("authorization"), 0u) << r.target;
  for (const auto& r : hub.requests())
    if (r.headers.count("authorization")) {
      EXPECT_TRUE(r.headers.at("authorization") == "Bearer hf_secret" || r.headers.at("authorization") == "Bearer wrong");
    }

  env.set("HF_TOKEN", std::nullopt).set("HF_HOME", (tmp.path / "home").string());
  write_file(tmp.path / "home" / "token", "hf_secret\n");
  o.check_for_updates = true;
  EXPECT_EQ(resolve_model_dir("Org/Model", o), snap);
  env.set("HF_TOKEN_PATH", (tmp.path / "missing-token").string());
  EXPECT_NE(expect_error([&] { resolve_model_dir("Org/Model", o); }).find("HTTP 401"), std::string::npos);
}

TEST_F(HubDownload, NotFoundErrorsNameWhatIsMissing) {
  const HubOptions o = server_options(hub, tmp.path);
  std::string err = expect_error([&] { resolve_model_dir("Org/Nope", o); });
  EXPECT_NE(err.find("repository Org/Nope not found"), std::string::npos) << err;
  err = expect_error([&] { resolve_model_dir("Org/Model@v9", o); });
  EXPECT_NE(err.find("revision 'v9' not found in Org/Model"), std::string::npos) << err;
  hub.files.erase("tokenizer.json");
  err = expect_error([&] { resolve_model_dir("Org/Model", o); });
  EXPECT_NE(err.find("has no file tokenizer.json (HTTP 404)"), std::string::npos) << err;
}

TEST_F(HubDownload, RenamedRepoSingleWeightsAndCommitRevision) {
  hub.files = {{"config.json", {"{}", false}}, {"tokenizer.json", {"{}", false}},
               {"generation_config.json", {"{\"a\": 1}", false}}, {"model.safetensors", {random_bytes(5000, 3), true}}};
  hub.renamed_from = "Old/Name";
  const HubOptions o = server_options(hub, tmp.path);
  const std::string snap = resolve_model_dir("Old/Name@" + kCommit, o);
  EXPECT_EQ(snap, (tmp.path / "models--Old--Name" / "snapshots" / kCommit).string());
  EXPECT_FALSE(fs::exists(tmp.path / "models--Old--Name" / "refs"));  // a commit revision writes no ref
  EXPECT_EQ(read_file(fs::path(snap) / "model.safetensors"), hub.files["model.safetensors"].content);
  EXPECT_EQ(read_file(fs::path(snap) / "generation_config.json"), "{\"a\": 1}");
}

TEST_F(HubDownload, IncludeGlobsFetchMatchingFilesOnly) {
  const HubOptions o = server_options(hub, tmp.path);
  const std::string snap = download_repo({"Org/Model", "main"}, {"*.md", "tokenizer*"}, o);
  std::set<std::string> got;
  for (const auto& e : fs::directory_iterator(snap)) got.insert(e.path().filename().string());
  EXPECT_EQ(got, (std::set<std::string>{"README.md", "tokenizer.json", "tokenizer_config.json"}));
  EXPECT_EQ(read_file(tmp.path / "models--Org--Model" / "refs" / "main"), kCommit);
  const std::string err = expect_error([&] { download_repo({"Org/Model", "main"}, {"*.bin"}, o); });
  EXPECT_NE(err.find("no file of Org/Model@main matches --include *.bin"), std::string::npos) << err;
}

TEST_F(HubDownload, NetworkFailureIsOneClearLineAfterRetries) {
  std::string endpoint;
  {
    FakeHub closed;  // a port that was just free: nothing listens there once it is gone
    endpoint = closed.url();
  }
  HubOptions o;
  o.endpoint = endpoint;
  o.cache_dir = tmp.path.string();
  o.offline = false;
  o.max_attempts = 2;
  o.retry_base_ms = 1;
  o.progress = false;
  const std::string err = expect_error([&] { resolve_model_dir("Org/Model", o); });
  EXPECT_NE(err.find("cannot download config.json"), std::string::npos) << err;
  EXPECT_NE(err.find("after 2 attempts"), std::string::npos) << err;
  EXPECT_NE(err.find("HF_HUB_OFFLINE"), std::string::npos) << err;
}

TEST_F(HubDownload, CliCommandPrintsTheSnapshotFolder) {
  env.set("HF_ENDPOINT", hub.url()).set("HF_HUB_CACHE", tmp.path.string());
  const std::string cmd = std::string(QT_BINARY) + " download Org/Model --revision main --quiet 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  EXPECT_EQ(::pclose(p), 0) << out;
  const fs::path snap = tmp.path / "models--Org--Model" / "snapshots" / kCommit;
  EXPECT_EQ(out, snap.string() + "\n");
  EXPECT_EQ(read_file(snap / kShard2), hub.files[kShard2].content);

  const std::string bad = std::string(QT_BINARY) + " download Org/Model@main --revision dev 2>&1";
  p = ::popen(bad.c_str(), "r");
  ASSERT_NE(p, nullptr);
  out.clear();
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  EXPECT_NE(::pclose(p), 0);
  EXPECT_NE(out.find("revision given twice"), std::string::npos) << out;
}
