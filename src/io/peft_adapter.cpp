// PEFT LoRA adapters on disk: DIR/adapter_config.json + DIR/adapter_model.safetensors.
//
// adapter_config.json (PEFT's LoraConfig, keys sorted): peft_type "LORA", r, lora_alpha,
// use_rslora, lora_dropout, bias "none", target_modules, base_model_name_or_path, ...
// Reading rejects every PEFT feature that would change the math here (DoRA, rank/alpha patterns,
// layer subsets, trainable bias, modules_to_save, target_parameters, ...).
// target_modules is resolved the way PEFT matches module names of the (v4-style) HF model: a
// list matches a module whose name equals an entry or ends with "." + entry; a string is a regex
// that must match the whole name ("all-linear" is PEFT's shorthand for every Linear but lm_head).
//
// adapter_model.safetensors: base_model.model.<module>.lora_A.weight (r,in), .lora_B.weight (out,r)
// (".lora_A.default.weight" from raw state dicts is accepted too); expert adapters per expert
// (mlp.experts.E.<proj>) or fused (mlp.<proj>, A (E,r,in), B (E,out,r)). Every targeted module
// must be present with the right shape, every tensor in the file must be used.
#include <array>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "io/atomic_file.h"
#include "io/safetensors.h"
#include "model/lora.h"

namespace qt {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

std::string read_text_file(const std::string& path, const char* context) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(context, "{}: cannot open", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail(context, "{}: read error", path);
  return ss.str();
}

// Module names of the HF (v4 layout) model that PEFT would match targets against; `slot` >= 0
// for the projections LoRA can adapt here, -1 for modules it cannot (norms, router, lm_head,
// embeddings, containers).
struct ModuleName {
  std::string name;
  int slot;
};

std::vector<ModuleName> model_module_names(const ModelConfig& c) {
  std::vector<ModuleName> m = {{"model", -1}, {"model.embed_tokens", -1}, {"model.layers", -1},
                               {"model.norm", -1}, {"model.rotary_emb", -1}, {"lm_head", -1}};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    for (const char* x : {"", "self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
      m.push_back({*x ? p + x : p.substr(0, p.size() - 1), -1});
    if (c.qk_norm) {
      m.push_back({p + "self_attn.q_norm", -1});
      m.push_back({p + "self_attn.k_norm", -1});
    }
    for (int s = kLoraQ; s <= kLoraO; ++s) m.push_back({p + "self_attn." + lora_slot_module(LoraSlot(s)), s});
    if (c.is_moe_layer(l)) {
      m.push_back({p + "mlp.gate", -1});
      m.push_back({p + "mlp.experts", -1});
      for (int64_t e = 0; e < c.num_experts; ++e) {
        m.push_back({fmt::format("{}mlp.experts.{}", p, e), -1});
        for (int s = kLoraGate; s <= kLoraDown; ++s)
          m.push_back({fmt::format("{}mlp.experts.{}.{}", p, e, lora_slot_module(LoraSlot(s))), s});
      }
    } else {
      for (int s = kLoraGate; s <= kLoraDown; ++s) m.push_back({p + "mlp." + lora_slot_module(LoraSlot(s)), s});
    }
  }
  return m;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Resolves PEFT's target_modules (list or regex string) to slots targeted in every layer.
std::vector<std::string> resolve_targets(const json& t, const ModelConfig& mcfg, const std::string& origin) {
  std::vector<ModuleName> names = model_module_names(mcfg);
  std::vector<char> hit(names.size(), 0);
  if (t.is_array()) {
    for (const json& item : t) {
      if (!item.is_string()) fail("adapter", "{}: 'target_modules' entries must be strings, got {}", origin, item.dump());
      const std::string key = item.get<std::string>(), suffix = "." + key;
      for (size_t i = 0; i < names.size(); ++i)
        if (names[i].name == key || ends_with(names[i].name, suffix)) hit[i] = 1;
    }
  } else if (t.is_string() && t.get<std::string>() == "all-linear") {
    for (size_t i = 0; i < names.size(); ++i) hit[i] = names[i].slot >= 0;
    for (int64_t l = 0; l < mcfg.num_hidden_layers; ++l)
      if (mcfg.is_moe_layer(l))
        fail("adapter", "{}: 'target_modules' \"all-linear\" includes the MoE router (mlp.gate), which has no LoRA "
             "support here", origin);
  } else if (t.is_string()) {
    std::regex re;
    try {
      re = std::regex(t.get<std::string>(), std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      fail("adapter", "{}: 'target_modules' regex \"{}\" is not supported here ({})", origin, t.get<std::string>(), e.what());
    }
    for (size_t i = 0; i < names.size(); ++i) hit[i] = std::regex_match(names[i].name, re);
  } else {
    fail("adapter", "{}: 'target_modules' must be a list of names or a regex string, got {}", origin, t.dump());
  }
  std::array<int64_t, kNumLoraSlots> total{}, matched{};
  bool any = false;
  for (size_t i = 0; i < names.size(); ++i) {
    if (hit[i] && names[i].slot < 0)
      fail("adapter", "{}: 'target_modules' selects '{}', which has no LoRA support here (only "
           "q/k/v/o_proj and gate/up/down_proj)", origin, names[i].name);
    if (names[i].slot < 0) continue;
    total[size_t(names[i].slot)]++;
    matched[size_t(names[i].slot)] += hit[i];
    any = any || hit[i];
  }
  if (!any) fail("adapter", "{}: 'target_modules' {} matches no module of this model", origin, t.dump());
  std::vector<std::string> out;
  for (int s = 0; s < kNumLoraSlots; ++s) {
    if (matched[size_t(s)] == 0) continue;
    if (matched[size_t(s)] != total[size_t(s)])
      fail("adapter", "{}: 'target_modules' selects {} in only {} of {} modules (layer or expert subsets are not "
           "supported)", origin, lora_slot_module(LoraSlot(s)), matched[size_t(s)], total[size_t(s)]);
    out.push_back(lora_slot_module(LoraSlot(s)));
  }
  return out;
}

// Every key not known to be harmless must be unused (null, false, "none", {} or []): PEFT keeps
// adding features (DoRA, rank patterns, layer subsets, target_parameters, ...) that change the
// math, and an adapter using one must not load silently as plain LoRA.
void reject_unsupported_keys(const json& j, const std::string& origin) {
  static const std::set<std::string> harmless = {
      // read by parse_peft_adapter_config
      "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "target_modules",
      "base_model_name_or_path",
      // bookkeeping
      "task_type", "peft_version", "revision", "auto_mapping", "inference_mode", "megatron_config", "megatron_core",
      // initialisation only (the stored tensors are what counts)
      "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
      // parameters of features that are off unless their own switch is set (checked below)
      "qalora_group_size", "ensure_weight_tying"};
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (harmless.count(it.key())) continue;
    const json& v = it.value();
    const bool unused = v.is_null() || v == json(false) || v == json("none") ||
                        ((v.is_object() || v.is_array()) && v.empty());
    if (!unused) fail("adapter", "{}: '{}' {} is not supported", origin, it.key(), v.dump());
  }
}

double json_number(const json& j, const char* key, double fallback, const std::string& origin) {
  if (!j.contains(key) || j.at(key).is_null()) return fallback;
  if (!j.at(key).is_number()) fail("adapter", "{}: '{}' must be a number, got {}", origin, key, j.at(key).dump());
  return j.at(key).get<double>();
}

std::string expert_name(int64_t l, int64_t e, int s, const char* ab) {
  return fmt::format("base_model.model.model.layers.{}.mlp.experts.{}.{}.lora_{}.weight", l, e,
                     lora_slot_module(LoraSlot(s)), ab);
}
std::string module_name(int64_t l, int s, const char* ab) {
  return fmt::format("base_model.model.model.layers.{}.{}.{}.lora_{}.weight", l, s <= kLoraO ? "self_attn" : "mlp",
                     lora_slot_module(LoraSlot(s)), ab);
}

// The adapter file's tensors under normalised names (".lora_X.default.weight" -> ".lora_X.weight").
class AdapterTensors {
 public:
  AdapterTensors(const std::string& path, DType dtype) : file_(path), path_(path), dtype_(dtype) {
    for (const std::string& n : file_.names()) {
      std::string k = n;
      for (const char* ab : {".lora_A", ".lora_B"}) {
        const std::string from = std::string(ab) + ".default.weight";
        if (ends_with(k, from)) k = k.substr(0, k.size() - from.size()) + ab + ".weight";
      }
      if (!by_name_.emplace(k, n).second) fail("adapter", "{}: tensors '{}' and '{}' collide", path, by_name_.at(k), n);
    }
  }
  bool has(const std::string& name) const { return by_name_.count(name) != 0; }

  // Converts `name` (checked to have `shape`) into dst[offset ...).
  void read(const std::string& name, const Shape& shape, Tensor& dst, int64_t offset) {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) fail("adapter", "{}: {}: missing (expected shape {})", path_, name, shape_str(shape));
    const SafetensorsEntry& e = file_.entry(it->second);
    if (e.shape != shape)
      fail("adapter", "{}: {}: shape {}, expected {} for this model and r", path_, it->second, shape_str(e.shape),
           shape_str(shape));
    if (e.dtype != DType::F32 && e.dtype != DType::BF16 && e.dtype != DType::F16 && e.dtype != DType::F64)
      fail("adapter", "{}: {}: dtype {} is not a float type", path_, it->second, dtype_name(e.dtype));
    if (!used_.insert(name).second) fail("adapter", "{}: {}: used twice", path_, it->second);
    Tensor v = file_.view(it->second);
    convert_elements(static_cast<char*>(dst.raw()) + size_t(offset) * dtype_size(dtype_), dtype_, v.raw(), v.dtype(),
                     size_t(v.numel()));
  }
  void check_all_used() const {
    for (const auto& [k, n] : by_name_)
      if (!used_.count(k))
        fail("adapter", "{}: {}: unexpected tensor (not a LoRA A/B of a module targeted by adapter_config.json)", path_, n);
  }

 private:
  SafetensorsCheckpoint file_;
  std::string path_;
  DType dtype_;
  std::map<std::string, std::string> by_name_;  // normalised -> name in the file
  std::set<std::string> used_;
};

}  // namespace

LoraConfig parse_peft_adapter_config(const std::string& json_text, const std::string& origin, const ModelConfig& mcfg) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail("adapter", "{}: invalid JSON: {}", origin, e.what());
  }
  if (!j.is_object()) fail("adapter", "{}: the top level must be a JSON object", origin);
  if (!j.contains("peft_type") || !j.at("peft_type").is_string())
    fail("adapter", "{}: 'peft_type' missing or not a string", origin);
  if (j.at("peft_type").get<std::string>() != "LORA")
    fail("adapter", "{}: 'peft_type' {} is not supported (only LORA)", origin, j.at("peft_type").dump());
  reject_unsupported_keys(j, origin);
  if (j.contains("bias") && !j.at("bias").is_null() && j.at("bias") != json("none"))
    fail("adapter", "{}: 'bias' {} is not supported (only \"none\")", origin, j.at("bias").dump());

  LoraConfig c;  // absent keys take PEFT's LoraConfig defaults
  c.r = 8;
  if (j.contains("r") && !j.at("r").is_null()) {
    if (!j.at("r").is_number_integer()) fail("adapter", "{}: 'r' must be an integer, got {}", origin, j.at("r").dump());
    c.r = j.at("r").get<int64_t>();
  }
  c.alpha = json_number(j, "lora_alpha", 8, origin);
  c.dropout = json_number(j, "lora_dropout", 0.0, origin);
  if (j.contains("use_rslora") && !j.at("use_rslora").is_null()) {
    if (!j.at("use_rslora").is_boolean()) fail("adapter", "{}: 'use_rslora' must be true or false", origin);
    c.use_rslora = j.at("use_rslora").get<bool>();
  }
  if (j.contains("base_model_name_or_path") && j.at("base_model_name_or_path").is_string())
    c.base_model_name_or_path = j.at("base_model_name_or_path").get<std::string>();
  if (!j.contains("target_modules") || j.at("target_modules").is_null())
    fail("adapter", "{}: 'target_modules' is missing", origin);
  c.target_modules = resolve_targets(j.at("target_modules"), mcfg, origin);
  try {
    c.validate();
  } catch (const Error& e) {
    fail("adapter", "{}: {}", origin, e.what());
  }
  return c;
}

LoraAdapter load_peft_adapter(const std::string& dir, const ModelConfig& mcfg, DType dtype) {
  if (dtype != DType::F32 && dtype != DType::F64 && dtype != DType::BF16 && dtype != DType::F16)
    fail("adapter", "{}: dtype {} is not a float type", dir, dtype_name(dtype));
  const std::string cfg_path = dir + "/adapter_config.json";
  LoraAdapter a;
  a.cfg = parse_peft_adapter_config(read_text_file(cfg_path, "adapter"), cfg_path, mcfg);
  const std::string st_path = dir + "/adapter_model.safetensors";
  if (!fs::exists(st_path)) {
    if (fs::exists(dir + "/adapter_model.bin"))
      fail("adapter", "{}: only adapter_model.bin (a pickle) is present; convert it to safetensors", dir);
    fail("adapter", "{}: missing", st_path);
  }
  AdapterTensors file(st_path, dtype);
  const int64_t r = a.cfg.r;
  a.layers.resize(size_t(mcfg.num_hidden_layers));
  for (int64_t l = 0; l < mcfg.num_hidden_layers; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      if (!a.cfg.targets(LoraSlot(s))) continue;
      const LoraSlotShape sh = lora_slot_shape(mcfg, l, LoraSlot(s));
      LoraPair& p = a.layers[size_t(l)].slot[size_t(s)];
      const std::string nA = module_name(l, s, "A"), nB = module_name(l, s, "B");
      if (!sh.experts) {
        p.A = Tensor::empty({r, sh.in}, dtype);
        p.B = Tensor::empty({sh.out, r}, dtype);
        file.read(nA, {r, sh.in}, p.A, 0);
        file.read(nB, {sh.out, r}, p.B, 0);
        continue;
      }
      const int64_t E = sh.experts;
      p.A = Tensor::empty({E, r, sh.in}, dtype);
      p.B = Tensor::empty({E, sh.out, r}, dtype);
      if (file.has(nA) || file.has(nB)) {  // fused layout
        file.read(nA, {E, r, sh.in}, p.A, 0);
        file.read(nB, {E, sh.out, r}, p.B, 0);
        continue;
      }
      bool any_expert = false;
      for (int64_t e = 0; e < E && !any_expert; ++e)
        any_expert = file.has(expert_name(l, e, s, "A")) || file.has(expert_name(l, e, s, "B"));
      if (!any_expert)
        fail("adapter", "{}: no LoRA tensors for the experts' {} in MoE layer {} (expected {} ... or fused {}); "
             "note that PEFT on transformers v5 models does not adapt experts through target_modules",
             st_path, lora_slot_module(LoraSlot(s)), l, expert_name(l, 0, s, "A"), nA);
      for (int64_t e = 0; e < E; ++e) {  // per-expert layout: every expert must be there
        file.read(expert_name(l, e, s, "A"), {r, sh.in}, p.A, e * r * sh.in);
        file.read(expert_name(l, e, s, "B"), {sh.out, r}, p.B, e * sh.out * r);
      }
    }
  file.check_all_used();
  return a;
}

void save_peft_adapter(const std::string& dir, const LoraAdapter& a, const ModelConfig& mcfg, bool fused_experts) {
  a.cfg.validate();
  QT_ASSERT(int64_t(a.layers.size()) == mcfg.num_hidden_layers, "adapter has {} layers, model {}", a.layers.size(),
            mcfg.num_hidden_layers);
  for (int64_t l = 0; l < mcfg.num_hidden_layers; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s) {
      const LoraPair& p = a.layers[size_t(l)].slot[size_t(s)];
      const LoraSlotShape sh = lora_slot_shape(mcfg, l, LoraSlot(s));
      QT_ASSERT(p.present() == a.cfg.targets(LoraSlot(s)), "layer {} {}: present {} but targeted {}", l,
                lora_slot_module(LoraSlot(s)), p.present(), a.cfg.targets(LoraSlot(s)));
      if (!p.present()) continue;
      const Shape wantA = sh.experts ? Shape{sh.experts, a.cfg.r, sh.in} : Shape{a.cfg.r, sh.in};
      const Shape wantB = sh.experts ? Shape{sh.experts, sh.out, a.cfg.r} : Shape{sh.out, a.cfg.r};
      QT_ASSERT(p.A.shape() == wantA && p.B.shape() == wantB, "layer {} {}: A {} B {}, expected {} {}", l,
                lora_slot_module(LoraSlot(s)), shape_str(p.A.shape()), shape_str(p.B.shape()), shape_str(wantA),
                shape_str(wantB));
    }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("adapter", "{}: cannot create the directory: {}", dir, ec.message());

  auto tensors = lora_named_tensors(a, mcfg, fused_experts);
  for (auto& [name, t] : tensors)
    if (t.dtype() != DType::F32) t = t.to(DType::F32);
  write_safetensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});

  json c;  // PEFT's LoraConfig keys that every PEFT release since 0.10 understands
  c["peft_type"] = "LORA";
  c["task_type"] = "CAUSAL_LM";
  c["r"] = a.cfg.r;
  if (a.cfg.alpha == std::floor(a.cfg.alpha) && std::fabs(a.cfg.alpha) < 1e15) c["lora_alpha"] = int64_t(a.cfg.alpha);
  else c["lora_alpha"] = a.cfg.alpha;
  c["lora_dropout"] = a.cfg.dropout;
  c["use_rslora"] = a.cfg.use_rslora;
  c["target_modules"] = a.cfg.target_modules;
  c["base_model_name_or_path"] = a.cfg.base_model_name_or_path.empty() ? json(nullptr) : json(a.cfg.base_model_name_or_path);
  c["bias"] = "none";
  c["fan_in_fan_out"] = false;
  c["inference_mode"] = true;
  c["init_lora_weights"] = true;
  c["layers_to_transform"] = nullptr;
  c["layers_pattern"] = nullptr;
  c["layer_replication"] = nullptr;
  c["modules_to_save"] = nullptr;
  c["rank_pattern"] = json::object();
  c["alpha_pattern"] = json::object();
  c["use_dora"] = false;
  c["revision"] = nullptr;
  c["auto_mapping"] = nullptr;
  c["megatron_config"] = nullptr;
  c["megatron_core"] = "megatron.core";
  c["loftq_config"] = json::object();
  write_file_atomically(dir + "/adapter_config.json", c.dump(2) + "\n", "adapter");
}

}  // namespace qt
