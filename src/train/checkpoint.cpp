// Checkpoint writing, validation and restoring (see checkpoint.h for the layout and the guarantees).
#include "train/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "io/atomic_file.h"
#include "io/safetensors.h"

namespace qt {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kFormat = "qwentune checkpoint";
constexpr int kVersion = 1;
constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
const char* const kRequiredFiles[] = {"adapter_config.json", "adapter_model.safetensors", kOptimizerFile};

std::string errno_text() { return std::strerror(errno); }

// The test hook QT_FAULT_KILL_DURING_SAVE=STEP:STAGE (checkpoint.h).
void fault_point(int64_t step, const char* stage) {
  const char* env = std::getenv("QT_FAULT_KILL_DURING_SAVE");
  if (!env) return;
  if (std::string(env) != fmt::format("{}:{}", step, stage)) return;
  std::fprintf(stderr, "qwentune: test hook: SIGKILL while saving checkpoint-%lld (stage %s)\n", (long long)step, stage);
  std::fflush(stderr);
  std::raise(SIGKILL);
}

// Removes a folder when the save fails before it is committed.
struct FolderGuard {
  fs::path path;
  bool armed = true;
  ~FolderGuard() {
    std::error_code ec;
    if (armed) fs::remove_all(path, ec);
  }
};

// Hidden leftovers of interrupted saves or prunes: .checkpoint-N.tmp-PID, .checkpoint-N.old-PID, ...
void remove_stale_temporaries(const fs::path& out_dir) {
  std::error_code ec;
  std::vector<fs::path> stale;
  for (const auto& e : fs::directory_iterator(out_dir, ec))
    if (e.path().filename().string().rfind(".checkpoint-", 0) == 0) stale.push_back(e.path());
  for (const fs::path& p : stale) {
    fs::remove_all(p, ec);
    if (ec) std::fprintf(stderr, "qwentune: warning: cannot remove %s: %s\n", p.c_str(), ec.message().c_str());
  }
}

// Renames `tmp` to `dst`. An existing `dst` (a checkpoint of the same step from an earlier run) is
// swapped out atomically, or, where the file system cannot exchange, moved aside first; the old
// contents end up at `tmp` (the caller removes it).
void move_into_place(const fs::path& tmp, const fs::path& dst) {
  if (::rename(tmp.c_str(), dst.c_str()) == 0) return;
  if (errno != ENOTEMPTY && errno != EEXIST)
    fail("checkpoint", "cannot rename {} to {}: {}", tmp.string(), dst.string(), errno_text());
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dst.c_str(), RENAME_EXCHANGE) == 0) return;
  const fs::path aside = dst.parent_path() / fmt::format(".{}.old-{}", dst.filename().string(), ::getpid());
  if (::rename(dst.c_str(), aside.c_str()) != 0)
    fail("checkpoint", "cannot move {} aside: {}", dst.string(), errno_text());
  if (::rename(tmp.c_str(), dst.c_str()) != 0) {
    const std::string err = errno_text();
    (void)::rename(aside.c_str(), dst.c_str());
    fail("checkpoint", "cannot rename {} to {}: {}", tmp.string(), dst.string(), err);
  }
  std::error_code ec;
  fs::rename(aside, tmp, ec);
}

// Removes the oldest checkpoints beyond `limit` (never `keep`): each is first renamed to a hidden
// name, so a half-deleted folder never carries a checkpoint's name.
void prune_checkpoints(const fs::path& out_dir, int64_t limit, const std::string& keep) {
  if (limit <= 0) return;
  std::vector<std::string> all = list_checkpoints(out_dir.string());
  int64_t excess = int64_t(all.size()) - limit;
  for (const std::string& name : all) {
    if (excess <= 0) break;
    if (name == keep) continue;
    const fs::path doomed = out_dir / fmt::format(".{}.del-{}", name, ::getpid());
    std::error_code ec;
    fs::rename(out_dir / name, doomed, ec);
    if (!ec) fs::remove_all(doomed, ec);
    if (ec) std::fprintf(stderr, "qwentune: warning: cannot remove old %s: %s\n", name.c_str(), ec.message().c_str());
    --excess;
  }
  fsync_directory(out_dir.string());
}

json loss_points_json(const std::vector<LossPoint>& v) {
  json a = json::array();
  for (const LossPoint& p : v) a.push_back({p.step, p.loss});
  return a;
}

json state_json(const TrainerState& st) {
  json j;
  j["format"] = kFormat;
  j["version"] = kVersion;
  j["global_step"] = st.global_step;
  j["scheduler_step"] = st.global_step;
  j["total_steps"] = st.total_steps;
  j["epoch"] = st.epoch;
  j["batch_in_epoch"] = st.batch_in_epoch;
  j["optimizer_step"] = st.optimizer_step;
  j["seed"] = st.seed;
  j["steps_done"] = st.steps_done;
  j["steps_skipped"] = st.steps_skipped;
  j["consecutive_bad"] = st.consecutive_bad;
  j["first_loss"] = st.first_loss;
  j["last_loss"] = st.last_loss;
  j["logging"] = {{"loss_since_log", st.loss_since_log},
                  {"steps_since_log", st.steps_since_log},
                  {"tokens_since_log", st.tokens_since_log}};
  j["elapsed_s"] = st.elapsed_s;
  j["rng"] = {{"saved_state", nullptr},
              {"data_order", "epoch_order(seed, epoch): a pure function, resumed by (epoch, batch_in_epoch)"},
              {"lora_init", "replaced by the saved adapter"},
              {"lora_dropout", "counter-based hash of (seed, step, micro-batch, layer, slot, element)"}};
  j["fingerprint"] = st.fingerprint;
  j["loss_history"] = {{"train", loss_points_json(st.train_loss)}, {"eval", loss_points_json(st.eval_loss)}};
  return j;
}

// Typed field access for trainer_state.json; `where` is the file's path for messages.
template <typename T>
T field(const json& j, const char* key, const std::string& where) {
  const auto it = j.find(key);
  const bool ok = it != j.end() && (std::is_same_v<T, double> ? it->is_number() : it->is_number_integer());
  if (!ok) fail("checkpoint", "{}: '{}' is missing or not a number", where, key);
  return it->get<T>();
}

std::vector<LossPoint> loss_points_from(const json& a, const std::string& where, const char* what) {
  if (!a.is_array()) fail("checkpoint", "{}: loss_history.{} is not a list", where, what);
  std::vector<LossPoint> out;
  for (const json& p : a) {
    if (!p.is_array() || p.size() != 2 || !p[0].is_number_integer() || !p[1].is_number())
      fail("checkpoint", "{}: loss_history.{} has an entry that is not [step, value]", where, what);
    out.push_back({p[0].get<int64_t>(), p[1].get<double>()});
  }
  return out;
}

TrainerState state_from_json(const json& j, const std::string& where) {
  TrainerState st;
  st.global_step = field<int64_t>(j, "global_step", where);
  st.total_steps = field<int64_t>(j, "total_steps", where);
  st.epoch = field<int64_t>(j, "epoch", where);
  st.batch_in_epoch = field<int64_t>(j, "batch_in_epoch", where);
  st.optimizer_step = field<int64_t>(j, "optimizer_step", where);
  st.seed = field<int64_t>(j, "seed", where);
  st.steps_done = field<int64_t>(j, "steps_done", where);
  st.steps_skipped = field<int64_t>(j, "steps_skipped", where);
  st.consecutive_bad = field<int64_t>(j, "consecutive_bad", where);
  st.first_loss = field<double>(j, "first_loss", where);
  st.last_loss = field<double>(j, "last_loss", where);
  st.elapsed_s = field<double>(j, "elapsed_s", where);
  if (!j.contains("logging") || !j["logging"].is_object()) fail("checkpoint", "{}: 'logging' is missing", where);
  st.loss_since_log = field<double>(j["logging"], "loss_since_log", where);
  st.steps_since_log = field<int64_t>(j["logging"], "steps_since_log", where);
  st.tokens_since_log = field<int64_t>(j["logging"], "tokens_since_log", where);
  if (!j.contains("fingerprint") || !j["fingerprint"].is_object())
    fail("checkpoint", "{}: 'fingerprint' is missing", where);
  st.fingerprint = j["fingerprint"];
  if (!j.contains("loss_history") || !j["loss_history"].is_object())
    fail("checkpoint", "{}: 'loss_history' is missing", where);
  st.train_loss = loss_points_from(j["loss_history"].value("train", json()), where, "train");
  st.eval_loss = loss_points_from(j["loss_history"].value("eval", json()), where, "eval");
  if (st.global_step < 0 || st.global_step > st.total_steps || st.epoch < 0 || st.batch_in_epoch < 0 ||
      st.optimizer_step < 0 || st.optimizer_step > st.global_step || st.steps_done + st.steps_skipped != st.global_step)
    fail("checkpoint", "{}: inconsistent counters (global_step {}, total_steps {}, epoch {}, batch_in_epoch {}, "
         "optimizer_step {}, steps_done {}, steps_skipped {})", where, st.global_step, st.total_steps, st.epoch,
         st.batch_in_epoch, st.optimizer_step, st.steps_done, st.steps_skipped);
  return st;
}

std::string read_file_text(const fs::path& p, const std::string& dir) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail("checkpoint", "{}: no readable {} (an incomplete or damaged checkpoint)", dir, p.filename().string());
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string canonical_text(const std::string& path) {
  std::error_code ec;
  const fs::path c = fs::weakly_canonical(fs::path(path), ec);
  return ec ? path : c.string();
}

std::string short_dump(const json& v) {
  std::string s = v.is_null() ? "(absent)" : v.dump();
  if (s.size() > 120) s = s.substr(0, 117) + "...";
  return s;
}

}  // namespace

std::string tokenized_dataset_sha256(const data::TokenizedDataset& ds) {
  Sha256 h;
  auto add = [&](const auto& v) {
    const uint64_t n = v.size();
    h.update(&n, sizeof n);
    h.update(v.data(), v.size() * sizeof(v[0]));
  };
  add(ds.input_ids);
  add(ds.labels);
  add(ds.seq_offsets);
  add(ds.doc_lengths);
  add(ds.seq_doc_offsets);
  return h.hex_digest();
}

json training_fingerprint(const TrainConfig& tc, const std::string& model_config_path, int64_t total_steps,
                          const std::string& train_data_sha256, int world_size) {
  json f;
  f["base_model"] = canonical_text(tc.base_model);
  f["model_config_sha256"] = sha256_file_hex(model_config_path);
  json ds = json::array();
  for (const DatasetSpec& d : tc.datasets) ds.push_back({{"path", canonical_text(d.path)}, {"type", d.type}});
  f["datasets"] = ds;
  f["chat_template"] = tc.chat_template;
  f["train_on_inputs"] = tc.train_on_inputs;
  f["sequence_len"] = tc.sequence_len;
  f["sample_packing"] = tc.sample_packing;
  f["val_set_size"] = tc.val_set_size;
  f["seed"] = tc.seed;
  f["micro_batch_size"] = tc.micro_batch_size;
  f["gradient_accumulation_steps"] = tc.gradient_accumulation_steps;
  f["total_steps"] = total_steps;
  const LoraConfig lc = tc.lora_config();
  f["adapter"] = tc.adapter;
  f["lora_r"] = lc.r;
  f["lora_alpha"] = lc.alpha;
  f["lora_dropout"] = lc.dropout;
  f["use_rslora"] = lc.use_rslora;
  f["lora_target_modules"] = lc.target_modules;
  f["train_data_sha256"] = train_data_sha256;
  f["world_size"] = world_size;
  return f;
}

void check_fingerprint(const json& saved_as_written, const json& now_as_made, const std::string& dir) {
  // A fingerprint without world_size was written by one process (before the key existed).
  json saved = saved_as_written, now = now_as_made;
  for (json* f : {&saved, &now})
    if (f->is_object() && !f->contains("world_size")) (*f)["world_size"] = 1;
  std::vector<std::string> keys;
  for (const auto& [k, v] : now.items()) keys.push_back(k);
  for (const auto& [k, v] : saved.items())
    if (!now.contains(k)) keys.push_back(k);
  std::string diffs;
  for (const std::string& k : keys) {
    const json a = saved.value(k, json()), b = now.value(k, json());
    if (a == b) continue;
    diffs += fmt::format("{}{} (checkpoint {}, now {})", diffs.empty() ? "" : "; ", k, short_dump(a), short_dump(b));
  }
  if (!diffs.empty())
    fail("checkpoint", "{}: cannot resume, the run's settings differ from the checkpoint's: {}", dir, diffs);
}

int64_t checkpoint_step_from_name(const std::string& name) {
  const std::string prefix = "checkpoint-";
  if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size() || name.size() > prefix.size() + 18) return -1;
  int64_t step = 0;
  for (size_t i = prefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

std::vector<std::string> list_checkpoints(const std::string& output_dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(output_dir, ec)) {
    const std::string name = e.path().filename().string();
    const int64_t step = checkpoint_step_from_name(name);
    if (step >= 0 && e.is_directory(ec)) found.emplace_back(step, name);
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> out;
  for (auto& [step, name] : found) out.push_back(name);
  return out;
}

std::string save_checkpoint(const std::string& output_dir, const LoraAdapter& lora, const ModelConfig& mcfg,
                            const AdamW& opt, const TrainerState& st, int64_t save_total_limit,
                            const std::function<void(const std::string&)>& write_extra) {
  const fs::path out_dir(output_dir);
  const int64_t step = st.global_step;
  const std::string name = fmt::format("checkpoint-{}", step);
  remove_stale_temporaries(out_dir);
  FolderGuard tmp{out_dir / fmt::format(".{}.tmp-{}", name, ::getpid())};
  std::error_code ec;
  fs::create_directories(tmp.path, ec);
  if (ec) fail("checkpoint", "cannot create {}: {}", tmp.path.string(), ec.message());

  save_peft_adapter(tmp.path.string(), lora, mcfg);
  fault_point(step, "adapter");
  const OptimizerState os = opt.state();
  write_safetensors((tmp.path / kOptimizerFile).string(), os.tensors,
                    {{"format", "pt"}, {"step", std::to_string(os.step)}});
  fault_point(step, "optimizer");
  if (write_extra) write_extra(tmp.path.string());

  // trainer_state.json last, with the size and hash of every other file.
  json files = json::object();
  std::vector<fs::path> paths;
  for (const auto& e : fs::directory_iterator(tmp.path, ec))
    if (e.is_regular_file(ec) && e.path().filename() != kStateFile) paths.push_back(e.path());
  if (ec) fail("checkpoint", "cannot list {}: {}", tmp.path.string(), ec.message());
  std::sort(paths.begin(), paths.end());
  for (const fs::path& p : paths) {
    const uintmax_t size = fs::file_size(p, ec);
    if (ec) fail("checkpoint", "{}: cannot read its size: {}", p.string(), ec.message());
    files[p.filename().string()] = {{"size", size}, {"sha256", sha256_file_hex(p.string())}};
  }
  json j = state_json(st);
  j["optimizer_step"] = os.step;
  j["files"] = files;
  write_file_atomically((tmp.path / kStateFile).string(), j.dump(1) + "\n", "checkpoint");
  fault_point(step, "state");

  const fs::path dst = out_dir / name;
  move_into_place(tmp.path, dst);  // on an exchange, tmp now holds the replaced checkpoint (removed below)
  fsync_directory(out_dir.string());
  fault_point(step, "renamed");
  fs::remove_all(tmp.path, ec);
  tmp.armed = false;
  prune_checkpoints(out_dir, save_total_limit, name);
  return dst.string();
}

TrainerState validate_checkpoint(const std::string& dir) {
  const fs::path d(dir);
  std::error_code ec;
  if (!fs::is_directory(d, ec)) fail("checkpoint", "{}: not a folder", dir);
  const std::string where = (d / kStateFile).string();
  json j;
  try {
    j = json::parse(read_file_text(d / kStateFile, dir));
  } catch (const json::exception& e) {
    fail("checkpoint", "{}: does not parse ({}); the checkpoint is damaged", where, e.what());
  }
  if (!j.is_object() || j.value("format", "") != kFormat)
    fail("checkpoint", "{}: not a qwentune trainer state (\"format\" is not \"{}\")", where, kFormat);
  const json version = j.value("version", json());
  if (!version.is_number_integer() || version.get<int64_t>() != kVersion)
    fail("checkpoint", "{}: version {} is not supported (expected {})", where, version.dump(), kVersion);
  const json files = j.value("files", json());
  if (!files.is_object()) fail("checkpoint", "{}: 'files' is missing", where);
  for (const char* req : kRequiredFiles)
    if (!files.contains(req)) fail("checkpoint", "{}: 'files' does not list {}", where, req);
  for (const auto& [fname, rec] : files.items()) {
    if (fname.empty() || fname.find('/') != std::string::npos || fname == "." || fname == ".." || fname == kStateFile)
      fail("checkpoint", "{}: bad file name '{}' in 'files'", where, fname);
    if (!rec.is_object() || !rec.contains("size") || !rec.at("size").is_number_unsigned() || !rec.contains("sha256") ||
        !rec.at("sha256").is_string())
      fail("checkpoint", "{}: 'files.{}' needs a size and a sha256", where, fname);
    const uintmax_t want_size = rec.at("size").get<uintmax_t>();
    const fs::path p = d / fname;
    const uintmax_t size = fs::file_size(p, ec);
    if (ec) fail("checkpoint", "{}: {} is missing (an incomplete checkpoint)", dir, fname);
    if (size != want_size)
      fail("checkpoint", "{}: {} has {} bytes, trainer_state.json recorded {} (incomplete or modified)", dir, fname,
           size, want_size);
    if (sha256_file_hex(p.string()) != rec.at("sha256").get<std::string>())
      fail("checkpoint", "{}: {} does not match its recorded SHA-256 (the file is corrupted or was modified)", dir,
           fname);
  }
  TrainerState st = state_from_json(j, where);
  const int64_t named = checkpoint_step_from_name(d.filename().string());
  if (named >= 0 && named != st.global_step)
    fail("checkpoint", "{}: the folder is named for step {} but trainer_state.json holds step {}", dir, named,
         st.global_step);
  return st;
}

ResumePoint find_resume_checkpoint(const std::string& output_dir) {
  const std::vector<std::string> names = list_checkpoints(output_dir);
  for (auto it = names.rbegin(); it != names.rend(); ++it) {
    const std::string dir = (fs::path(output_dir) / *it).string();
    try {
      return {dir, validate_checkpoint(dir)};
    } catch (const Error& e) {
      std::fprintf(stderr, "qwentune: warning: skipping %s: %s\n", it->c_str(), e.what());
    }
  }
  if (names.empty())
    fail("checkpoint", "{}: no checkpoint to resume from (no checkpoint-STEP folder; checkpoints are written every "
         "save_steps steps, on Ctrl-C and with --stop-after-steps)", output_dir);
  fail("checkpoint", "{}: no valid checkpoint to resume from ({} checkpoint folders, none valid)", output_dir,
       names.size());
}

void load_checkpoint_weights(const ResumePoint& from, const ModelConfig& mcfg, LoraAdapter& lora, AdamW& opt) {
  const std::string& dir = from.dir;
  LoraAdapter saved = load_peft_adapter(dir, mcfg, DType::F32);
  if (saved.layers.size() != lora.layers.size())
    fail("checkpoint", "{}: the adapter has {} layers, the model {}", dir, saved.layers.size(), lora.layers.size());
  for (size_t l = 0; l < lora.layers.size(); ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      LoraPair& want = lora.layers[l].slot[size_t(s)];
      const LoraPair& got = saved.layers[l].slot[size_t(s)];
      if (want.present() != got.present() ||
          (want.present() && (want.A.shape() != got.A.shape() || want.B.shape() != got.B.shape())))
        fail("checkpoint", "{}: layer {} {}: the saved adapter does not match the configured LoRA settings", dir, l,
             lora_slot_module(LoraSlot(s)));
    }
  const std::string opt_path = (fs::path(dir) / kOptimizerFile).string();
  const SafetensorsFile f(opt_path);
  OptimizerState os;
  for (const SafetensorsEntry& e : f.entries()) os.tensors.emplace_back(e.name, f.view(e.name).clone());
  const auto step_it = f.metadata().find("step");
  if (step_it == f.metadata().end()) fail("checkpoint", "{}: no \"step\" in the metadata", opt_path);
  try {
    size_t used = 0;
    os.step = std::stoll(step_it->second, &used);
    if (used != step_it->second.size()) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    fail("checkpoint", "{}: metadata step '{}' is not an integer", opt_path, step_it->second);
  }
  if (os.step != from.state.optimizer_step)
    fail("checkpoint", "{}: optimizer step {} differs from trainer_state.json's {}", opt_path, os.step,
         from.state.optimizer_step);
  opt.load_state(os, opt_path);  // validates names and shapes before changing anything
  for (size_t l = 0; l < lora.layers.size(); ++l) lora.layers[l] = std::move(saved.layers[l]);
}

void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return;
  std::string line, kept;
  while (std::getline(f, line)) {
    const json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) continue;
    if (j["step"].get<int64_t>() <= step) kept += line + "\n";
  }
  write_file_atomically(path, kept, "checkpoint");
}

}  // namespace qt
