// Token choice and streaming text: HF-ordered temperature / top-k / top-p filters on hand-made
// distributions and against HF transformers' warpers (tests/data/sampling), greedy ties, seeded sampling (reproducible, and following the distribution),
// generation defaults from config.json + generation_config.json, stop tokens, and the UTF-8-safe
// streaming decoder on CJK and emoji text split across byte-level tokens.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <vector>

#include "data/dataset_reader.h"
#include "model/generation.h"
#include "model/sampling.h"
#include "tokenizer/token_streamer.h"
#include "tokenizer/tokenizer.h"

using namespace qt;
namespace fs = std::filesystem;

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();

std::vector<double> log_probs(const std::vector<double>& p) {
  std::vector<double> l;
  for (double x : p) l.push_back(std::log(x));
  return l;
}

std::vector<bool> kept(const std::vector<double>& scores) {
  std::vector<bool> k;
  for (double s : scores) k.push_back(s != -kInf);
  return k;
}

const Tokenizer& bundled_tokenizer() {
  static const Tokenizer tok = Tokenizer::load(std::string(QT_SOURCE_DIR) + "/data/qwen3-tokenizer");
  return tok;
}
}  // namespace

TEST(Sampling, TemperatureDividesScores) {
  std::vector<double> s = {1.0, -2.0, 0.5};
  apply_temperature(s, 0.5);
  EXPECT_EQ(s, (std::vector<double>{2.0, -4.0, 1.0}));
  apply_temperature(s, 1.0);
  EXPECT_EQ(s, (std::vector<double>{2.0, -4.0, 1.0}));
}

TEST(Sampling, TopKKeepsTheKLargestAndTiesAtTheThreshold) {
  std::vector<double> s = {0.1, 3.0, -1.0, 2.0, 2.5};
  top_k_filter(s, 2);
  EXPECT_EQ(kept(s), (std::vector<bool>{false, true, false, false, true}));
  EXPECT_EQ(s[1], 3.0);
  std::vector<double> ties = {1.0, 2.0, 2.0, 0.0};  // HF: scores < 2nd largest are removed
  top_k_filter(ties, 2);
  EXPECT_EQ(kept(ties), (std::vector<bool>{false, true, true, false}));
  std::vector<double> all = {1.0, 2.0};
  top_k_filter(all, 0);  // off
  top_k_filter(all, 5);  // k >= V: nothing removed
  EXPECT_EQ(kept(all), (std::vector<bool>{true, true}));
}

TEST(Sampling, TopPRemovesTheTailWhoseMassIsAtMostOneMinusP) {
  // probs 0.5, 0.3, 0.15, 0.05: ascending cumulative 0.05, 0.20, 0.50, 1.0.
  const std::vector<double> base = log_probs({0.5, 0.3, 0.15, 0.05});
  std::vector<double> s = base;
  top_p_filter(s, 0.75);  // removes cumulative <= 0.25: 0.05 and 0.15
  EXPECT_EQ(kept(s), (std::vector<bool>{true, true, false, false}));
  s = base;
  top_p_filter(s, 0.9);  // removes cumulative <= 0.1: only 0.05
  EXPECT_EQ(kept(s), (std::vector<bool>{true, true, true, false}));
  s = base;
  top_p_filter(s, 0.01);  // the most likely token always stays (min_tokens_to_keep = 1)
  EXPECT_EQ(kept(s), (std::vector<bool>{true, false, false, false}));
  s = base;
  top_p_filter(s, 1.0);
  EXPECT_EQ(kept(s), (std::vector<bool>{true, true, true, true}));
  // After top-k the removed tokens have probability 0 and the rest renormalise: top-2 of the above
  // leaves 0.5/0.8 and 0.3/0.8 = 0.375; top_p 0.6 removes cumulative <= 0.4, i.e. the 0.375 one.
  s = base;
  top_k_filter(s, 2);
  top_p_filter(s, 0.6);
  EXPECT_EQ(kept(s), (std::vector<bool>{true, false, false, false}));
}

TEST(Sampling, GreedyTakesTheFirstMaximum) {
  const std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f};
  EXPECT_EQ(argmax_token(l.data(), 4), 1);
  Sampler s(SamplingOptions{}, 0);
  EXPECT_EQ(s.next(l.data(), 4), 1);
}

TEST(Sampling, SeededDrawsAreReproducibleAndFollowTheDistribution) {
  const std::vector<double> probs = {0.5, 0.3, 0.15, 0.05};
  const std::vector<double> logits = log_probs(probs);
  SamplingOptions so;
  so.do_sample = true;
  so.top_k = 0;
  auto draws = [&](uint64_t seed, int n) {
    Sampler s(so, seed);
    std::vector<int32_t> out;
    for (int i = 0; i < n; ++i) out.push_back(s.next(logits.data(), 4));
    return out;
  };
  EXPECT_EQ(draws(7, 50), draws(7, 50));
  EXPECT_NE(draws(7, 50), draws(8, 50));
  const std::vector<int32_t> many = draws(1, 20000);
  for (int t = 0; t < 4; ++t) {
    const double freq = double(std::count(many.begin(), many.end(), t)) / double(many.size());
    EXPECT_NEAR(freq, probs[size_t(t)], 0.015) << "token " << t;  // > 4 standard deviations
  }
  // top_p = 0.75 leaves tokens 0 and 1, renormalised to 0.625 / 0.375.
  so.top_p = 0.75;
  const std::vector<int32_t> nucleus = draws(2, 20000);
  EXPECT_EQ(std::count(nucleus.begin(), nucleus.end(), 2) + std::count(nucleus.begin(), nucleus.end(), 3), 0);
  EXPECT_NEAR(double(std::count(nucleus.begin(), nucleus.end(), 0)) / 20000.0, 0.625, 0.015);
}

TEST(Sampling, BadOptionsAreUserErrors) {
  SamplingOptions so;
  so.do_sample = true;
  so.temperature = 0;
  EXPECT_THROW(so.validate(), Error);
  so.temperature = 1;
  so.top_p = 1.5;
  EXPECT_THROW(so.validate(), Error);
  so.top_p = 0.9;
  so.top_k = -1;
  EXPECT_THROW(so.validate(), Error);
  so.top_k = 5;
  EXPECT_NO_THROW(so.validate());
}

TEST(Generation, DefaultsFromConfigAndGenerationConfig) {
  const fs::path dir = fs::temp_directory_path() / ("qt_test_gencfg_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"model_type": "qwen3", "eos_token_id": 151645})";
  GenerationDefaults d = read_generation_defaults((dir / "config.json").string());
  EXPECT_FALSE(d.from_generation_config);
  EXPECT_FALSE(d.sampling.do_sample);
  EXPECT_EQ(d.sampling.top_k, 50);  // HF GenerationConfig default
  EXPECT_EQ(d.sampling.top_p, 1.0);
  EXPECT_EQ(d.eos_ids, (std::vector<int32_t>{151645}));
  std::ofstream(dir / "generation_config.json")
      << R"({"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "eos_token_id": [151645, 151643]})";
  d = read_generation_defaults((dir / "config.json").string());
  EXPECT_TRUE(d.from_generation_config);
  EXPECT_TRUE(d.sampling.do_sample);
  EXPECT_EQ(d.sampling.temperature, 0.6);
  EXPECT_EQ(d.sampling.top_k, 20);
  EXPECT_EQ(d.sampling.top_p, 0.95);
  const Tokenizer& tok = bundled_tokenizer();
  const std::vector<int32_t> stops = stop_token_ids(d.eos_ids, tok);
  EXPECT_EQ(stops, (std::vector<int32_t>{151643, 151645}));  // also <|endoftext|>, <|im_end|>: the same ids
  EXPECT_EQ(tok.token_to_id("<|im_end|>"), 151645);
  std::ofstream(dir / "generation_config.json") << R"({"top_k": "many"})";
  EXPECT_THROW(read_generation_defaults((dir / "config.json").string()), Error);
  fs::remove_all(dir);
}

TEST(TokenStreamer, CompletePrefixOfUtf8) {
  EXPECT_EQ(utf8_complete_prefix("abc"), 3u);
  EXPECT_EQ(utf8_complete_prefix("a\xE4\xB8"), 1u);         // 世 cut after 2 of 3 bytes
  EXPECT_EQ(utf8_complete_prefix("a\xE4\xB8\x96"), 4u);     // 世 complete
  EXPECT_EQ(utf8_complete_prefix("\xF0\x9F\x99"), 0u);      // 🙂 cut after 3 of 4 bytes
  EXPECT_EQ(utf8_complete_prefix("\xF0\x9F\x99\x82"), 4u);
  EXPECT_EQ(utf8_complete_prefix("x\x80"), 2u);             // a stray continuation byte passes through
  EXPECT_EQ(utf8_complete_prefix("x\xC0"), 2u);             // not a lead byte of any valid sequence
  EXPECT_EQ(utf8_complete_prefix(""), 0u);
}

TEST(TokenStreamer, CjkAndEmojiRoundTripTokenByToken) {
  const Tokenizer& tok = bundled_tokenizer();
  const std::string text = "你好，世界！今天天气很好。🙂👍🏽🇯🇵 こんにちは 안녕하세요 Ünïcödé ∑ ok";
  const std::vector<int32_t> ids = tok.encode(text);
  TokenStreamer st(tok);
  std::string out;
  int partial_tokens = 0;
  for (int32_t id : ids) {
    const std::string one = tok.decode({id});
    if (data::find_invalid_utf8(one) != std::string::npos) ++partial_tokens;  // splits a character
    const std::string piece = st.push(id);
    EXPECT_EQ(data::find_invalid_utf8(piece), std::string::npos) << "emitted a broken character";
    out += piece;
  }
  out += st.finish();
  EXPECT_EQ(out, text);
  EXPECT_GT(partial_tokens, 0) << "the text no longer exercises characters split across tokens";
}

// The warpers against HF transformers 5.17 (tools/make_sampling_golden.py): 156 cases of
// temperature x top_k x top_p on 64 float32 logits, including rows with many equal values (ties at
// the top-k threshold); the kept set must be identical and the kept scores equal to float32
// rounding (HF divides by the temperature in float32, we in double).
TEST(Sampling, WarpersMatchTransformers) {
  std::ifstream f(std::string(QT_TEST_DATA) + "/sampling/hf_warpers.json");
  ASSERT_TRUE(f.good());
  const nlohmann::json j = nlohmann::json::parse(f);
  int n = 0;
  for (const auto& c : j["cases"]) {
    const double t = c["temperature"].get<double>(), p = c["top_p"].get<double>();
    const int64_t k = c["top_k"].get<int64_t>();
    SCOPED_TRACE(::testing::Message() << "case " << n << ": temperature " << t << " top_k " << k << " top_p " << p);
    std::vector<double> s = c["logits"].get<std::vector<double>>();
    apply_temperature(s, t);
    top_k_filter(s, k);
    top_p_filter(s, p);
    const std::vector<bool> want = c["kept"].get<std::vector<bool>>();
    EXPECT_EQ(kept(s), want);
    for (size_t i = 0; i < s.size(); ++i)
      if (want[i] && s[i] != -kInf) {
        EXPECT_NEAR(s[i], c["scores"][i].get<double>(), 1e-6 * std::fabs(s[i]) + 1e-7);
      }
    ++n;
  }
  EXPECT_EQ(n, 156);
}
