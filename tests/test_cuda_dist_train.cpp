// Data-parallel training on the GPU (skipped without a GPU; the 2-GPU case without two GPUs).
//  - One GPU: the CUDA engine on its collective path (DataParallel::force_collectives, an NCCL
//    communicator of one rank: the gradient buckets all-reduced on the side stream during the last
//    micro-batch's backward, a step where the rank has no micro-batch, the loss all-reduce, the
//    host-value sum) equals the plain engine bit for bit, dense and MoE: the hooks, the stream
//    ordering and the bucket plan lose or double nothing (a one-rank all-reduce is a copy).
//  - Two GPUs: `qwentune train --gpus 2` with gradient_accumulation_steps 1 follows the one-GPU run
//    with 2 (the same global batches; only the order of fp32 gradient additions differs) within
//    1e-3 relative on every logged loss and gradient norm, and rank 0 alone writes output_dir.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "dist/rendezvous.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "model/weights.h"
#include "ops/cuda/runtime.h"
#include "dist_train_case.h"
#include "test_files.h"
#include "train/optimizer.h"
#include "train/train_engine.h"

namespace fs = std::filesystem;

namespace {

#define SKIP_WITHOUT_GPU() \
  if (qt::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

qt::Batch random_batch(int64_t B, int64_t S, int64_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  qt::Batch b;
  b.B = B, b.S = S;
  for (int64_t i = 0; i < B * S; ++i) {
    const int32_t id = int32_t(rng() % uint32_t(vocab));
    b.input_ids.push_back(id);
    b.labels.push_back(i % S < 3 ? -100 : id);  // a masked prompt at the start of each row
  }
  return b;
}

struct Trace {
  std::vector<double> loss, norm;
  std::vector<bool> applied;
  qt::LoraAdapter lora;
};

// Three steps: two micro-batches, one, none (a rank without data in a ragged tail step).
Trace train(const std::string& model, bool collective) {
  const qt::ModelConfig cfg = qt::load_hf_config(std::string(QT_SOURCE_DIR) + "/configs/" + model);
  const qt::ModelWeights w = qt::random_model_weights(cfg, qt::DType::F32, 5);
  qt::LoraConfig lc;
  lc.r = 4, lc.alpha = 8;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  qt::LoraAdapter lora = qt::init_lora(cfg, lc, qt::DType::F32, 9);
  for (auto& layer : lora.layers)  // B != 0 so every gradient is live from step 1
    for (auto& p : layer.slot)
      if (p.present())
        for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<float>()[i] = 0.01f * float((i * 7919) % 13 - 6);
  qt::AdamW opt(lora, qt::AdamWConfig{});
  qt::dist::RendezvousOptions ro;  // world of one: no network
  qt::dist::Rendezvous rv(ro);
  qt::DataParallel dp;
  dp.rv = &rv, dp.force_collectives = collective;
  dp.bucket_bytes = 4096;  // many buckets over the tiny adapter: launched layer by layer during the backward
  auto engine = qt::make_cuda_engine(w, lora, opt, dp);
  const std::vector<std::vector<qt::Batch>> steps = {
      {random_batch(2, 48, cfg.vocab_size, 1), random_batch(3, 40, cfg.vocab_size, 2)},
      {random_batch(2, 64, cfg.vocab_size, 3)},
      {}};
  Trace t;
  for (size_t s = 0; s < steps.size(); ++s) {
    const int64_t n = s == 2 ? 100 : [&] {  // a ragged-tail rank: N counts the other ranks' tokens
      int64_t c = 0;
      for (const auto& b : steps[s]) c += b.predicted_tokens();
      return c;
    }();
    engine->begin_step(int64_t(steps[s].size()));
    for (size_t i = 0; i < steps[s].size(); ++i)
      engine->accumulate(steps[s][i], 1.0 / double(n), {0.1, 3, int64_t(s), int64_t(i)});
    const qt::EngineStepStats st = engine->finish_step(1e-3, 1.0);
    t.loss.push_back(st.loss_sum), t.norm.push_back(st.grad_norm), t.applied.push_back(st.applied);
  }
  std::vector<double> sums{1.5, -2.0};
  engine->sum_over_ranks(sums);
  EXPECT_EQ(sums, (std::vector<double>{1.5, -2.0}));
  engine->sync_to_host(lora, opt);
  t.lora = lora;
  return t;
}

void expect_same_adapter(const qt::LoraAdapter& a, const qt::LoraAdapter& b) {
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (size_t s = 0; s < a.layers[l].slot.size(); ++s) {
      const auto& x = a.layers[l].slot[s];
      const auto& y = b.layers[l].slot[s];
      ASSERT_EQ(x.present(), y.present());
      if (!x.present()) continue;
      for (const auto& [p, q] : {std::make_pair(&x.A, &y.A), std::make_pair(&x.B, &y.B)}) {
        ASSERT_EQ(p->numel(), q->numel());
        int64_t differ = 0;
        for (int64_t i = 0; i < p->numel(); ++i) differ += p->data<float>()[i] != q->data<float>()[i];
        EXPECT_EQ(differ, 0) << "layer " << l << " slot " << s;
      }
    }
}

class CollectivePath : public ::testing::TestWithParam<const char*> {};

TEST_P(CollectivePath, OneRankEqualsThePlainEngineBitForBit) {
  SKIP_WITHOUT_GPU();
  const Trace plain = train(GetParam(), false), coll = train(GetParam(), true);
  EXPECT_EQ(plain.loss, coll.loss);
  EXPECT_EQ(plain.norm, coll.norm);
  EXPECT_EQ(plain.applied, coll.applied);
  ASSERT_EQ(plain.applied.size(), 3u);
  EXPECT_TRUE(plain.applied[0] && plain.applied[1] && plain.applied[2]);
  EXPECT_GT(plain.norm[0], 0.0);
  EXPECT_EQ(plain.norm[2], 0.0);  // no data on this rank, and one rank
  expect_same_adapter(plain.lora, coll.lora);
}

INSTANTIATE_TEST_SUITE_P(Models, CollectivePath, ::testing::Values("tiny-qwen3.json", "tiny-qwen3-moe.json"));

// --- two GPUs: `train --gpus 2` against one GPU with twice the accumulation ---

std::string quoted(const std::string& s) { return "'" + s + "'"; }

TEST(CudaDistTrain, TwoGpusFollowOneGpuWithTwiceTheAccumulation) {
  SKIP_WITHOUT_GPU();
  if (qt::cuda::device_count() < 2) GTEST_SKIP() << "needs two GPUs (" << qt::cuda::device_count() << " visible)";
  qt::test::TempDir tmp("cuda_dist");
  const fs::path one = tmp.path / "one", two = tmp.path / "two";
  const auto r1 = qt::test::run_command(quoted(QT_BINARY) + " train " + quoted(qt::test::write_dist_train_config(tmp.path, 2, "cuda")) +
                                        " --output_dir " + quoted(one.string()) + " 2>&1");
  ASSERT_EQ(r1.status, 0) << r1.output;
  const auto r2 = qt::test::run_command(quoted(QT_BINARY) + " train " + quoted(qt::test::write_dist_train_config(tmp.path, 1, "cuda")) +
                                        " --gpus 2 --output_dir " + quoted(two.string()) + " 2>&1");
  ASSERT_EQ(r2.status, 0) << r2.output;
  EXPECT_NE(r2.output.find("NCCL rank 0 of 2"), std::string::npos) << r2.output;
  EXPECT_NE(qt::test::read_file(two / "rank-1.log").find("rank 1: done (6 steps"), std::string::npos);
  for (const char* key : {"loss", "grad_norm"}) {
    const auto a = qt::test::read_metric(one / "metrics.jsonl", "train", key), b = qt::test::read_metric(two / "metrics.jsonl", "train", key);
    ASSERT_EQ(a.size(), 6u) << key;
    ASSERT_EQ(b.size(), 6u) << key;
    for (size_t i = 0; i < a.size(); ++i) {
      std::printf("[cuda-dist] %s step %zu: 1 GPU %.6f, 2 GPUs %.6f\n", key, i + 1, a[i], b[i]);
      EXPECT_LE(std::fabs(a[i] - b[i]), 1e-3 * std::fabs(a[i])) << key << " step " << i + 1;
    }
  }
}

}  // namespace
