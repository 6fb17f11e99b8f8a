// qwentune merge and convert-lora on the golden fixtures (tests/golden/README.md).
//
// Merge (f32 output): the merged model's logits from QwenDecoder<double> WITHOUT an adapter must
// equal (a) HF+PEFT's float64 logits with the adapter (expected.safetensors) and (b) our own forward
// of base + adapter, both within 1e-5 relative; the adapter must move the logits by far more than
// that (>= 1e-3), so the comparison would catch a missing or wrong delta. Names, shapes and every
// unadapted tensor stay as in the input (bit for bit at f32); the expert layout is kept.
// bf16/f16 merges equal the f32 merge rounded to that dtype, bit for bit. Sharding: a tiny shard
// size gives several shards, a consistent index, and the same model once loaded.
// convert-lora: per-expert -> fused -> per-expert reproduces the adapter file bit for bit.
// Errors: "[merge] ..." / "[convert-lora] ..." and nothing left behind.
//
// With QT_EXPORT_FIXTURES=DIR set, ExportFixtures.Write also writes the inputs of
// tools/check_export_hf.py (qwentune-written adapters and merged models) to DIR.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/batch_json.h"
#include "io/merge.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "model/lora.h"
#include "model/weights.h"
#include "test_files.h"

using namespace qt;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using qt::test::TempDir;

constexpr double kLogitsTol = 1e-5;
constexpr double kMinAdapterEffect = 1e-3;

const fs::path kGolden = fs::path(QT_SOURCE_DIR) / "tests" / "golden";

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string quoted(const fs::path& p) {
  std::string s = "'";
  for (char c : p.string()) s += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return s + "'";
}

double rel_diff(const Tensor& x, const Tensor& ref) {
  Tensor a = x.to(DType::F64), b = ref.to(DType::F64);
  EXPECT_EQ(shape_str(a.shape()), shape_str(b.shape()));
  if (a.numel() != b.numel()) return INFINITY;
  double d2 = 0, r2 = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double d = a.data<double>()[i] - b.data<double>()[i];
    d2 += d * d;
    r2 += b.data<double>()[i] * b.data<double>()[i];
  }
  return r2 > 0 ? std::sqrt(d2 / r2) : (d2 == 0 ? 0.0 : INFINITY);
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Logits (B,S,V) in float64 of `model_dir` (+ adapter when given) on the case's batch.
Tensor logits_of(const fs::path& model_dir, const fs::path& case_dir, const fs::path& adapter_dir = {}) {
  ModelWeights w = load_model_weights(model_dir.string(), DType::F64);
  LoraAdapter lora;
  if (!adapter_dir.empty()) lora = load_peft_adapter(adapter_dir.string(), w.cfg, DType::F64);
  Batch batch = load_batch_json((case_dir / "batch.json").string());
  QwenDecoder<double> dec(w, adapter_dir.empty() ? nullptr : &lora);
  return dec.forward_backward(batch, nullptr, /*keep_logits=*/true).logits;
}

Tensor expected_logits(const fs::path& case_dir) {
  SafetensorsFile f((case_dir / "expected.safetensors").string());
  return f.view("logits").clone();
}

MergeSummary merge(const fs::path& model, const fs::path& adapter, const fs::path& out, DType dtype,
                   uint64_t shard_bytes = 5'000'000'000ull, bool force = false) {
  MergeOptions o;
  o.model_dir = model.string();
  o.adapter_dir = adapter.string();
  o.out_dir = out.string();
  o.dtype = dtype;
  o.shard_bytes = shard_bytes;
  o.force = force;
  return merge_lora(o);
}

// Does the tensor take a LoRA delta (every golden adapter targets all seven projections)?
bool is_adapted_name(const std::string& n) {
  auto ends = [&](const std::string& s) { return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0; };
  return ends("_proj.weight") || ends("experts.gate_up_proj") || ends("experts.down_proj");
}

std::string expect_error(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no qt::Error thrown";
  return "";
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }

// ---- golden merges ---------------------------------------------------------------------------

struct MergeCase {
  std::string name, layout;
  fs::path dir, model;
};

void PrintTo(const MergeCase& c, std::ostream* os) { *os << c.name << "/" << c.layout; }

std::vector<MergeCase> merge_cases() {
  std::vector<MergeCase> out;
  std::error_code ec;
  std::vector<fs::path> dirs;
  for (const auto& e : fs::directory_iterator(kGolden, ec))
    if (e.is_directory() && fs::exists(e.path() / "expected.safetensors")) dirs.push_back(e.path());
  std::sort(dirs.begin(), dirs.end());
  for (const fs::path& d : dirs) {
    out.push_back({d.filename().string(), "hub", d, d});
    for (const char* layout : {"v5fused", "moefused"})
      if (fs::exists(d / (std::string("model_") + layout) / "model.safetensors"))
        out.push_back({d.filename().string(), layout, d, d / (std::string("model_") + layout)});
  }
  return out;
}

class MergeGolden : public ::testing::TestWithParam<MergeCase> {};

TEST_P(MergeGolden, F32MergeEqualsBasePlusAdapter) {
  const MergeCase& mc = GetParam();
  TempDir tmp(mc.name + "_" + mc.layout);
  const fs::path out = tmp.path / "merged";
  const MergeSummary s = merge(mc.model, mc.dir / "adapter", out, DType::F32);
  EXPECT_EQ(s.shards, 1);
  ASSERT_TRUE(fs::exists(out / "model.safetensors"));
  EXPECT_FALSE(fs::exists(out / "model.safetensors.index.json"));

  // Names and shapes as in the input; unadapted tensors bit-identical, adapted ones changed.
  SafetensorsCheckpoint in(mc.model.string()), got(out.string());
  ASSERT_EQ(in.names(), got.names());
  int64_t adapted = 0;
  for (const std::string& n : in.names()) {
    Tensor a = in.view(n), b = got.view(n);
    ASSERT_EQ(b.dtype(), DType::F32) << n;
    ASSERT_EQ(shape_str(a.shape()), shape_str(b.shape())) << n;
    if (is_adapted_name(n)) {
      EXPECT_FALSE(same_bytes(a, b)) << n << " did not change";
      ++adapted;
    } else {
      EXPECT_TRUE(same_bytes(a, b)) << n << " changed";
    }
  }
  EXPECT_GT(adapted, 0);
  EXPECT_EQ(s.tensors, int64_t(in.names().size()));

  // config.json: the input's, with the dtype set.
  json cin = json::parse(read_text(mc.model / "config.json")), cout = json::parse(read_text(out / "config.json"));
  EXPECT_EQ(cout.value("dtype", ""), "float32");
  cin.erase("dtype"), cout.erase("dtype");
  EXPECT_EQ(cin, cout);

  const Tensor want = expected_logits(mc.dir);
  const Tensor merged = logits_of(out, mc.dir);
  const Tensor ours = logits_of(mc.model, mc.dir, mc.dir / "adapter");
  const Tensor base = logits_of(mc.model, mc.dir);
  const double rel_hf = rel_diff(merged, want), rel_ours = rel_diff(merged, ours), effect = rel_diff(base, want);
  EXPECT_LE(rel_hf, kLogitsTol) << "merged vs HF+PEFT logits";
  EXPECT_LE(rel_ours, kLogitsTol) << "merged vs our base+adapter logits";
  EXPECT_GE(effect, kMinAdapterEffect) << "the adapter barely changes the logits; the test would prove nothing";
  std::printf("[merge] %s/%s: %lld matrices merged; logits rel vs HF %.2g, vs ours %.2g (adapter effect %.3f)\n",
              mc.name.c_str(), mc.layout.c_str(), (long long)s.merged_matrices, rel_hf, rel_ours, effect);
}

std::string case_label(const ::testing::TestParamInfo<MergeCase>& info) { return info.param.name + "_" + info.param.layout; }

INSTANTIATE_TEST_SUITE_P(Cases, MergeGolden, ::testing::ValuesIn(merge_cases()), case_label);

TEST(MergeGoldenFixtures, ArePresent) {
  const auto cases = merge_cases();
  EXPECT_GE(cases.size(), 9u) << "expected 7 golden cases + 2 extra layouts under " << kGolden;
}

// Expert layouts keep their names: v5 fused stays fused, moe-fused stays 3-D.
TEST(Merge, KeepsExpertLayoutNames) {
  TempDir tmp("layouts");
  const fs::path c = kGolden / "qwen3_moe_top2_norm";
  merge(c / "model_v5fused", c / "adapter", tmp.path / "v5", DType::F32);
  merge(c / "model_moefused", c / "adapter", tmp.path / "mf", DType::F32);
  merge(c, c / "adapter", tmp.path / "hub", DType::F32);
  SafetensorsCheckpoint v5((tmp.path / "v5").string()), mf((tmp.path / "mf").string()), hub((tmp.path / "hub").string());
  // E 6, moe I 24, H 48
  EXPECT_EQ(shape_str(v5.entry("model.layers.1.mlp.experts.gate_up_proj").shape), "[6, 48, 48]");
  EXPECT_EQ(shape_str(v5.entry("model.layers.1.mlp.experts.down_proj").shape), "[6, 48, 24]");
  EXPECT_FALSE(v5.contains("model.layers.1.mlp.experts.0.gate_proj.weight"));
  EXPECT_EQ(shape_str(mf.entry("model.layers.1.mlp.gate_proj.weight").shape), "[6, 24, 48]");
  EXPECT_EQ(shape_str(mf.entry("model.layers.1.mlp.down_proj.weight").shape), "[6, 48, 24]");
  EXPECT_EQ(shape_str(hub.entry("model.layers.1.mlp.experts.5.up_proj.weight").shape), "[24, 48]");
  // The three layouts hold the same merged numbers.
  Tensor gu = v5.view("model.layers.1.mlp.experts.gate_up_proj"), up_mf = mf.view("model.layers.1.mlp.up_proj.weight");
  Tensor up_hub = hub.view("model.layers.1.mlp.experts.3.up_proj.weight");
  const float* p_gu = gu.data<float>() + (3 * 48 + 24) * 48;  // expert 3, up rows (after 24 gate rows)
  const float* p_mf = up_mf.data<float>() + 3 * 24 * 48;
  EXPECT_EQ(std::memcmp(p_gu, up_hub.raw(), 24 * 48 * 4), 0);
  EXPECT_EQ(std::memcmp(p_mf, up_hub.raw(), 24 * 48 * 4), 0);
}

// bf16 (default) and f16 merges are the f32 merge rounded, bit for bit.
TEST(Merge, HalfPrecisionEqualsRoundedF32Merge) {
  for (const char* name : {"qwen2_bias_gqa", "qwen3_moe_mixed_top4", "qwen3_rslora"}) {
    TempDir tmp(std::string("half_") + name);
    const fs::path c = kGolden / name;
    merge(c, c / "adapter", tmp.path / "f32", DType::F32);
    MergeOptions o;  // defaults: bf16, 5GB shards
    o.model_dir = c.string();
    o.adapter_dir = (c / "adapter").string();
    o.out_dir = (tmp.path / "bf16").string();
    merge_lora(o);
    merge(c, c / "adapter", tmp.path / "f16", DType::F16);
    EXPECT_EQ(json::parse(read_text(tmp.path / "bf16" / "config.json")).value("dtype", ""), "bfloat16") << name;
    EXPECT_EQ(json::parse(read_text(tmp.path / "f16" / "config.json")).value("dtype", ""), "float16") << name;
    SafetensorsCheckpoint f32((tmp.path / "f32").string()), bf((tmp.path / "bf16").string()),
        hf((tmp.path / "f16").string());
    ASSERT_EQ(f32.names(), bf.names());
    ASSERT_EQ(f32.names(), hf.names());
    int64_t checked = 0;
    for (const std::string& n : f32.names()) {
      Tensor a = f32.view(n), b = bf.view(n), h = hf.view(n);
      ASSERT_EQ(b.dtype(), DType::BF16) << n;
      ASSERT_EQ(h.dtype(), DType::F16) << n;
      const float* pa = a.data<float>();
      const uint16_t* pb = static_cast<const uint16_t*>(b.raw());
      const uint16_t* ph = static_cast<const uint16_t*>(h.raw());
      int64_t bad_b = 0, bad_h = 0;
      for (int64_t i = 0; i < a.numel(); ++i) {
        bad_b += pb[i] != f32_to_bf16(pa[i]);
        bad_h += ph[i] != f32_to_f16(pa[i]);
      }
      EXPECT_EQ(bad_b, 0) << name << " " << n;
      EXPECT_EQ(bad_h, 0) << name << " " << n;
      checked += a.numel();
    }
    EXPECT_GT(checked, 1000);
    // The bf16 model still computes the adapted model to bf16 accuracy.
    const double rel = rel_diff(logits_of(tmp.path / "bf16", c), expected_logits(c));
    EXPECT_LE(rel, 0.05) << name;
    std::printf("[merge] %s bf16: logits rel vs HF+PEFT %.2g\n", name, rel);
  }
}

// A tiny shard size gives several shards; the index is consistent and the model loads back equal.
TEST(Merge, ShardsWithIndex) {
  TempDir tmp("shards");
  const fs::path c = kGolden / "qwen3_moe_top2_norm";
  merge(c, c / "adapter", tmp.path / "single", DType::F32);
  const uint64_t shard = 20000;  // bytes; the largest tensor (lm_head 300x48 f32 = 57600) gets its own
  const MergeSummary s = merge(c, c / "adapter", tmp.path / "sharded", DType::F32, shard);
  const fs::path out = tmp.path / "sharded";
  ASSERT_GE(s.shards, 3);
  EXPECT_FALSE(fs::exists(out / "model.safetensors"));
  const json index = json::parse(read_text(out / "model.safetensors.index.json"));
  ASSERT_TRUE(index.contains("metadata") && index.contains("weight_map"));
  const json& wm = index["weight_map"];
  SafetensorsCheckpoint single((tmp.path / "single").string());
  std::set<std::string> files, names;
  uint64_t total = 0;
  for (auto it = wm.begin(); it != wm.end(); ++it) {
    names.insert(it.key());
    files.insert(it.value().get<std::string>());
  }
  const std::vector<std::string> single_names = single.names();
  EXPECT_EQ(names, std::set<std::string>(single_names.begin(), single_names.end()));
  EXPECT_EQ(int64_t(files.size()), s.shards);
  for (int64_t i = 1; i <= s.shards; ++i) {
    const std::string f = fmt::format("model-{:05d}-of-{:05d}.safetensors", i, s.shards);
    ASSERT_TRUE(files.count(f)) << f;
    SafetensorsFile sf((out / f).string());
    uint64_t bytes = 0;
    for (const SafetensorsEntry& e : sf.entries()) {
      EXPECT_EQ(wm.at(e.name).get<std::string>(), f) << e.name;
      EXPECT_TRUE(same_bytes(sf.view(e.name), single.view(e.name))) << e.name;
      bytes += e.end - e.begin;
    }
    EXPECT_TRUE(bytes <= shard || sf.entries().size() == 1) << f << " holds " << bytes << " bytes";
    EXPECT_EQ(sf.metadata().count("format") ? sf.metadata().at("format") : "", "pt");
    total += bytes;
  }
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), total);
  EXPECT_EQ(s.total_bytes, total);
  // Layers stay together in natural order: shard of layer 0 tensors <= shard of layer 1 tensors.
  EXPECT_LE(wm.at("model.layers.0.self_attn.q_proj.weight").get<std::string>(),
            wm.at("model.layers.1.self_attn.q_proj.weight").get<std::string>());
  // Loads back (through the index) to the same model.
  const Tensor a = logits_of(out, c), b = logits_of(tmp.path / "single", c);
  EXPECT_TRUE(same_bytes(a, b));
}

TEST(Merge, ParseByteSize) {
  EXPECT_EQ(parse_byte_size("5GB"), 5000000000ull);
  EXPECT_EQ(parse_byte_size("500MB"), 500000000ull);
  EXPECT_EQ(parse_byte_size("2GiB"), 2147483648ull);
  EXPECT_EQ(parse_byte_size("1.5 kb"), 1500ull);
  EXPECT_EQ(parse_byte_size("123"), 123ull);
  EXPECT_EQ(parse_byte_size("10KiB"), 10240ull);
  for (const char* bad : {"", "GB", "5XB", "-1GB", "1.2.3MB", "0", "0.1", "1e999GB", "5 G B"})
    EXPECT_TRUE(starts_with(expect_error([&] { parse_byte_size(bad); }), "[merge] ")) << bad;
}

// ---- convert-lora ----------------------------------------------------------------------------

TEST(ConvertLora, RoundTripIsBitExact) {
  for (const char* name : {"qwen3_moe_top2_norm", "qwen3_moe_mixed_top4", "qwen3_moe_top1"}) {
    TempDir tmp(std::string("convert_") + name);
    const fs::path c = kGolden / name, orig = c / "adapter", fused = tmp.path / "fused", back = tmp.path / "back";
    // To fused through the CLI, back through the library.
    const fs::path log = tmp.path / "log.txt";
    const std::string cmd = std::string(quoted(QT_BINARY)) + " convert-lora --adapter " + quoted(orig) + " --model " +
                            quoted(c) + " --to fused --out " + quoted(fused) + " > " + quoted(log) + " 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << read_text(log);
    const ConvertLoraSummary s = convert_lora_layout(fused.string(), c.string(), /*fused=*/false, back.string());
    EXPECT_GT(s.expert_modules, 0);

    SafetensorsFile fo((orig / "adapter_model.safetensors").string()), ff((fused / "adapter_model.safetensors").string()),
        fb((back / "adapter_model.safetensors").string());
    // Fused: no per-expert names; A (E,r,in) whose slice e is the per-expert tensor bit for bit.
    int64_t fused_seen = 0;
    for (const SafetensorsEntry& e : ff.entries()) {
      EXPECT_EQ(e.name.find(".experts."), std::string::npos) << e.name;
      if (e.shape.size() != 3) continue;
      ++fused_seen;
      const std::string stem = e.name.substr(0, e.name.size() - std::string(".lora_A.weight").size());  // ...mlp.<proj>
      const std::string ab = e.name.substr(e.name.size() - std::string("A.weight").size(), 1);
      const size_t dot = stem.rfind('.');
      Tensor t = ff.view(e.name);
      for (int64_t x = 0; x < e.shape[0]; ++x) {
        const std::string per = fmt::format("{}.experts.{}{}.lora_{}.weight", stem.substr(0, dot), x, stem.substr(dot), ab);
        Tensor p = fo.view(per);
        EXPECT_EQ(std::memcmp(static_cast<const char*>(t.raw()) + x * p.nbytes(), p.raw(), p.nbytes()), 0) << per;
      }
    }
    EXPECT_GT(fused_seen, 0) << name;
    // Back: the original file's tensors, names, dtypes and bytes.
    ASSERT_EQ(fo.entries().size(), fb.entries().size()) << name;
    for (const SafetensorsEntry& e : fo.entries()) {
      ASSERT_TRUE(fb.contains(e.name)) << e.name;
      EXPECT_TRUE(same_bytes(fo.view(e.name), fb.view(e.name))) << e.name;
    }
    EXPECT_EQ(read_text(orig / "adapter_config.json"), read_text(back / "adapter_config.json"));
    EXPECT_EQ(read_text(orig / "adapter_config.json"), read_text(fused / "adapter_config.json"));
    // The fused adapter merges to the same model bit for bit.
    merge(c, orig, tmp.path / "m_per", DType::F32);
    merge(c, fused, tmp.path / "m_fused", DType::F32);
    SafetensorsCheckpoint m1((tmp.path / "m_per").string()), m2((tmp.path / "m_fused").string());
    for (const std::string& n : m1.names()) EXPECT_TRUE(same_bytes(m1.view(n), m2.view(n))) << n;
  }
}

TEST(ConvertLora, DenseAdapterIsUnchanged) {
  TempDir tmp("convert_dense");
  const fs::path c = kGolden / "qwen2_bias_gqa";
  const ConvertLoraSummary s = convert_lora_layout((c / "adapter").string(), c.string(), true, (tmp.path / "o").string());
  EXPECT_EQ(s.expert_modules, 0);
  SafetensorsFile a((c / "adapter" / "adapter_model.safetensors").string()),
      b((tmp.path / "o" / "adapter_model.safetensors").string());
  ASSERT_EQ(a.entries().size(), b.entries().size());
  for (const SafetensorsEntry& e : a.entries()) EXPECT_TRUE(same_bytes(a.view(e.name), b.view(e.name))) << e.name;
}

// ---- errors ----------------------------------------------------------------------------------

// A copy of a golden model with one tensor edited (reshaped) or dropped.
void write_edited_model(const fs::path& src, const fs::path& dst, const std::string& name, bool drop) {
  fs::create_directories(dst);
  fs::copy_file(src / "config.json", dst / "config.json");
  SafetensorsFile f((src / "model.safetensors").string());
  std::vector<std::pair<std::string, Tensor>> ts;
  for (const SafetensorsEntry& e : f.entries()) {
    Tensor t = f.view(e.name).clone();
    if (e.name == name) {
      if (drop) continue;
      t = t.reshape({t.dim(0) / 2, t.dim(1) * 2});
    }
    ts.emplace_back(e.name, t);
  }
  write_safetensors((dst / "model.safetensors").string(), ts, {{"format", "pt"}});
}

bool has_leftovers(const fs::path& dir) {
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) return true;
  return false;
}

TEST(MergeErrors, BadInputs) {
  TempDir tmp("errors");
  const fs::path c = kGolden / "qwen2_bias_gqa", out = tmp.path / "out";
  std::string m = expect_error([&] { merge(c, tmp.path / "no_such_adapter", out, DType::BF16); });
  EXPECT_TRUE(starts_with(m, "[merge] ")) << m;
  EXPECT_NE(m.find("no_such_adapter"), std::string::npos) << m;

  fs::create_directories(tmp.path / "empty_adapter");
  m = expect_error([&] { merge(c, tmp.path / "empty_adapter", out, DType::BF16); });
  EXPECT_TRUE(starts_with(m, "[merge] ")) << m;

  // An adapter made for another model.
  m = expect_error([&] { merge(kGolden / "qwen2_tied_mha", c / "adapter", out, DType::BF16); });
  EXPECT_TRUE(starts_with(m, "[merge] ")) << m;
  EXPECT_NE(m.find("shape"), std::string::npos) << m;

  // A checkpoint tensor whose shape disagrees with config.json, and a missing one.
  write_edited_model(c, tmp.path / "reshaped", "model.layers.0.self_attn.q_proj.weight", false);
  m = expect_error([&] { merge(tmp.path / "reshaped", c / "adapter", out, DType::BF16); });
  EXPECT_EQ(m, "[merge] model.layers.0.self_attn.q_proj.weight: shape [32, 128] in the checkpoint, expected [64, 64] "
               "for this config.json and the adapter");
  write_edited_model(c, tmp.path / "dropped", "model.layers.1.self_attn.k_proj.weight", true);
  m = expect_error([&] { merge(tmp.path / "dropped", c / "adapter", out, DType::BF16); });
  EXPECT_TRUE(starts_with(m, "[merge] the checkpoint has no weight for layer 1 k_proj")) << m;

  // A quantized model is refused.
  fs::create_directories(tmp.path / "quant");
  json cfg = json::parse(read_text(c / "config.json"));
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"}};
  std::ofstream(tmp.path / "quant" / "config.json") << cfg.dump();
  fs::copy_file(c / "model.safetensors", tmp.path / "quant" / "model.safetensors");
  m = expect_error([&] { merge(tmp.path / "quant", c / "adapter", out, DType::BF16); });
  EXPECT_NE(m.find("quantized"), std::string::npos) << m;

  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(has_leftovers(tmp.path));
}

TEST(MergeErrors, OutputDirectoryRules) {
  TempDir tmp("outdir");
  const fs::path c = kGolden / "qwen2_tied_mha", out = tmp.path / "out";
  fs::create_directories(out);
  merge(c, c / "adapter", out, DType::BF16);  // an empty directory is fine
  EXPECT_TRUE(fs::exists(out / "model.safetensors"));
  merge(c, c / "adapter", tmp.path / "a" / "b" / "out", DType::BF16);  // parents are created
  EXPECT_TRUE(fs::exists(tmp.path / "a" / "b" / "out" / "model.safetensors"));

  std::ofstream(out / "keep.txt") << "user data";
  std::string m = expect_error([&] { merge(c, c / "adapter", out, DType::BF16); });
  EXPECT_TRUE(starts_with(m, "[merge] ")) << m;
  EXPECT_NE(m.find("--force"), std::string::npos) << m;
  EXPECT_TRUE(fs::exists(out / "keep.txt"));

  merge(c, c / "adapter", out, DType::F32, 5'000'000'000ull, /*force=*/true);
  EXPECT_FALSE(fs::exists(out / "keep.txt"));
  EXPECT_EQ(SafetensorsCheckpoint(out.string()).entry("model.norm.weight").dtype, DType::F32);

  // The output may never be an input, even with --force.
  m = expect_error([&] { merge(c, c / "adapter", c, DType::BF16, 5'000'000'000ull, true); });
  EXPECT_TRUE(starts_with(m, "[merge] ")) << m;
  EXPECT_TRUE(fs::exists(c / "model.safetensors"));
  fs::create_directories(tmp.path / "parent");
  fs::copy(c, tmp.path / "parent" / "model", fs::copy_options::recursive);
  m = expect_error([&] { merge(tmp.path / "parent" / "model", c / "adapter", tmp.path / "parent", DType::BF16, 5'000'000'000ull, true); });
  EXPECT_NE(m.find("contains, the input"), std::string::npos) << m;
  EXPECT_TRUE(fs::exists(tmp.path / "parent" / "model" / "model.safetensors"));

  // convert-lora: same rules and its own prefix.
  m = expect_error([&] { convert_lora_layout((c / "adapter").string(), c.string(), true, out.string()); });
  EXPECT_TRUE(starts_with(m, "[convert-lora] ")) << m;
  m = expect_error(
      [&] { convert_lora_layout((c / "adapter").string(), (kGolden / "qwen2_bias_gqa").string(), true, (tmp.path / "x").string()); });
  EXPECT_TRUE(starts_with(m, "[convert-lora] ")) << m;
  EXPECT_FALSE(fs::exists(tmp.path / "x"));
  EXPECT_FALSE(has_leftovers(tmp.path));
}

TEST(MergeErrors, CliReportsOneLine) {
  TempDir tmp("cli");
  const fs::path c = kGolden / "qwen2_tied_mha", log = tmp.path / "log.txt";
  std::string cmd = std::string(quoted(QT_BINARY)) + " merge --model " + quoted(c) + " --adapter " +
                    quoted(tmp.path / "missing") + " --out " + quoted(tmp.path / "o") + " > " + quoted(log) + " 2>&1";
  int rc = std::system(cmd.c_str());
  EXPECT_NE(rc, 0);
  EXPECT_TRUE(starts_with(read_text(log), "qwentune: error: [merge] ")) << read_text(log);

  cmd = std::string(quoted(QT_BINARY)) + " merge --model " + quoted(c) + " --adapter " + quoted(c / "adapter") +
        " --out " + quoted(tmp.path / "o") + " --shard-size 5XB > " + quoted(log) + " 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  EXPECT_TRUE(starts_with(read_text(log), "qwentune: error: [merge] '5XB' is not a size")) << read_text(log);

  cmd = std::string(quoted(QT_BINARY)) + " merge --model " + quoted(c) + " --adapter " + quoted(c / "adapter") +
        " --out " + quoted(tmp.path / "o") + " --shard-size 1KB > " + quoted(log) + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << read_text(log);
  EXPECT_TRUE(fs::exists(tmp.path / "o" / "model.safetensors.index.json"));
  EXPECT_EQ(json::parse(read_text(tmp.path / "o" / "config.json")).value("dtype", ""), "bfloat16");
  load_model_weights((tmp.path / "o").string(), DType::F32);  // loads
}

// ---- fixtures for tools/check_export_hf.py (only with QT_EXPORT_FIXTURES set) ------------------

TEST(ExportFixtures, Write) {
  const char* dir = std::getenv("QT_EXPORT_FIXTURES");
  if (!dir || !*dir) GTEST_SKIP() << "QT_EXPORT_FIXTURES not set";
  const fs::path root(dir);
  fs::create_directories(root);
  for (const MergeCase& mc : merge_cases()) {
    const fs::path d = root / (mc.name + (mc.layout == "hub" ? "" : "_" + mc.layout));
    fs::remove_all(d);
    if (mc.layout == "hub") {  // the adapter as qwentune writes it (save_peft_adapter)
      const ModelConfig mcfg = load_hf_config(mc.model.string());
      const LoraAdapter a = load_peft_adapter((mc.dir / "adapter").string(), mcfg, DType::F32);
      save_peft_adapter((d / "adapter").string(), a, mcfg);
    }
    merge(mc.model, mc.dir / "adapter", d / "merged_f32", DType::F32);
    merge(mc.model, mc.dir / "adapter", d / "merged_bf16", DType::BF16, 30000);  // sharded
  }
}

}  // namespace
