// The pure parts of data-parallel training: the job's place from the environment (torchrun, Open
// MPI, Slurm), the data sharding with its ragged tails and loss normaliser, and the gradient buckets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>

#include "core/error.h"
#include "data/batch_iterator.h"
#include "io/hf_config.h"
#include "model/lora.h"
#include "model/weights.h"
#include "dist/dist_env.h"
#include "dist/grad_buckets.h"
#include "dist/sharding.h"

namespace qt::dist {
namespace {

using Vars = std::map<std::string, std::string>;

DistEnv env_of(const Vars& v) { return read_dist_env(env_from_map(v)); }

// The [dist] message read_dist_env throws for these variables ("" when it does not throw).
std::string env_error(const Vars& v) {
  try {
    env_of(v);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(DistEnv, NothingSetIsOneProcess) {
  const DistEnv d = env_of({});
  EXPECT_EQ(d.rank, 0);
  EXPECT_EQ(d.world_size, 1);
  EXPECT_FALSE(d.distributed());
  EXPECT_EQ(d.source, "single");
  EXPECT_EQ(d.describe(), "single process");
  // A world of one needs no master, from any source.
  EXPECT_FALSE(env_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}}).distributed());
  EXPECT_FALSE(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}}).distributed());
  EXPECT_FALSE(env_of({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "1"}}).distributed());
  // Stray master settings alone do not make a job.
  EXPECT_FALSE(env_of({{"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}}).distributed());
}

TEST(DistEnv, Torchrun) {
  const DistEnv d = env_of({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "4"},
                            {"MASTER_ADDR", "node-a"}, {"MASTER_PORT", "29500"}});
  EXPECT_EQ(d.rank, 5);
  EXPECT_EQ(d.world_size, 8);
  EXPECT_EQ(d.local_rank, 1);
  EXPECT_EQ(d.local_world_size, 4);
  EXPECT_EQ(d.master_addr, "node-a");
  EXPECT_EQ(d.master_port, 29500);
  EXPECT_EQ(d.source, "torchrun");
  EXPECT_EQ(d.describe(), "rank 5 of 8 (local 1 of 4), master node-a:29500, from torchrun");
  // LOCAL_WORLD_SIZE is optional (defaults to the world).
  EXPECT_EQ(env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}})
                .local_world_size,
            2);
}

TEST(DistEnv, TorchrunWinsOverSlurmAndMpi) {
  const DistEnv d = env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "h"},
                            {"MASTER_PORT", "1234"}, {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"},
                            {"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "1"}});
  EXPECT_EQ(d.source, "torchrun");
  EXPECT_EQ(d.rank, 1);
}

TEST(DistEnv, BadTorchrunSettings) {
  const Vars master{{"MASTER_ADDR", "h"}, {"MASTER_PORT", "29500"}};
  auto with = [&](Vars v) {
    v.insert(master.begin(), master.end());
    return env_error(v);
  };
  EXPECT_EQ(with({{"RANK", "1"}}), "[dist] WORLD_SIZE is not set (RANK, WORLD_SIZE and LOCAL_RANK go together, as torchrun sets them)");
  EXPECT_EQ(with({{"WORLD_SIZE", "2"}}), "[dist] RANK is not set (RANK, WORLD_SIZE and LOCAL_RANK go together, as torchrun sets them)");
  EXPECT_EQ(with({{"LOCAL_RANK", "0"}}), "[dist] WORLD_SIZE is not set (RANK, WORLD_SIZE and LOCAL_RANK go together, as torchrun sets them)");
  EXPECT_EQ(with({{"RANK", "1"}, {"WORLD_SIZE", "2"}}),
            "[dist] LOCAL_RANK is not set (RANK, WORLD_SIZE and LOCAL_RANK go together, as torchrun sets them)");
  EXPECT_EQ(with({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}), "[dist] RANK=2 is not below WORLD_SIZE=2");
  EXPECT_EQ(with({{"RANK", "1x"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}), "[dist] RANK=\"1x\": not an integer");
  EXPECT_EQ(with({{"RANK", ""}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}), "[dist] RANK=\"\": not an integer");
  EXPECT_EQ(with({{"RANK", "-1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}), "[dist] RANK=-1: must be in [0, 1048576]");
  EXPECT_EQ(with({{"RANK", "0"}, {"WORLD_SIZE", "0"}, {"LOCAL_RANK", "0"}}), "[dist] WORLD_SIZE=0: must be in [1, 1048576]");
  EXPECT_EQ(with({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}}),
            "[dist] local rank 2 is not below the 2 processes of this node (torchrun)");
  EXPECT_EQ(with({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "8"}}),
            "[dist] 8 processes on this node exceed the 4 of the whole job (torchrun)");
  // Several processes need the master's address and port.
  EXPECT_EQ(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_PORT", "29500"}}),
            "[dist] 2 processes (torchrun) need MASTER_ADDR and MASTER_PORT: the host and a free TCP port of rank 0");
  EXPECT_EQ(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"}}),
            "[dist] 2 processes (torchrun) need MASTER_ADDR and MASTER_PORT: the host and a free TCP port of rank 0");
  EXPECT_EQ(env_error({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "h"},
                       {"MASTER_PORT", "70000"}}),
            "[dist] MASTER_PORT=70000: must be in [1, 65535]");
}

TEST(DistEnv, OpenMpi) {
  const DistEnv d = env_of({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                            {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                            {"MASTER_ADDR", "10.1.2.3"}, {"MASTER_PORT", "6000"}});
  EXPECT_EQ(d.source, "openmpi");
  EXPECT_EQ(d.rank, 3);
  EXPECT_EQ(d.world_size, 4);
  EXPECT_EQ(d.local_rank, 1);
  EXPECT_EQ(d.local_world_size, 2);
  EXPECT_EQ(env_error({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}}),
            "[dist] 2 processes (openmpi) need MASTER_ADDR and MASTER_PORT: the host and a free TCP port of rank 0 "
            "(export them to every rank: mpirun -x MASTER_ADDR -x MASTER_PORT)");
  EXPECT_EQ(env_error({{"OMPI_COMM_WORLD_RANK", "1"}}),
            "[dist] OMPI_COMM_WORLD_SIZE is not set (mpirun sets OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE together)");
}

TEST(DistEnv, Slurm) {
  const Vars base{{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "6"}, {"SLURM_LOCALID", "0"}, {"MASTER_ADDR", "n1"},
                  {"MASTER_PORT", "29500"}};
  // Tasks per node from the compressed step list ("2(x2),1,1" = 2, 2, 1, 1), indexed by the node id.
  Vars v = base;
  v["SLURM_STEP_TASKS_PER_NODE"] = "2(x2),1,1";
  v["SLURM_NODEID"] = "1";
  DistEnv d = env_of(v);
  EXPECT_EQ(d.source, "slurm");
  EXPECT_EQ(d.rank, 4);
  EXPECT_EQ(d.world_size, 6);
  EXPECT_EQ(d.local_rank, 0);
  EXPECT_EQ(d.local_world_size, 2);
  v["SLURM_NODEID"] = "3";
  EXPECT_EQ(env_of(v).local_world_size, 1);
  v["SLURM_NODEID"] = "4";
  EXPECT_EQ(env_error(v), "[dist] SLURM_NODEID=4 but SLURM_STEP_TASKS_PER_NODE=\"2(x2),1,1\" lists 4 node(s)");
  v["SLURM_STEP_TASKS_PER_NODE"] = "2(y2)";
  EXPECT_EQ(env_error(v), "[dist] SLURM_STEP_TASKS_PER_NODE=\"2(y2)\": expected entries like 4 or 4(x2)");
  // SLURM_NTASKS_PER_NODE, when set, is the count; the step's task count wins over the allocation's.
  v = base;
  v["SLURM_NTASKS_PER_NODE"] = "3";
  v["SLURM_STEP_NUM_TASKS"] = "5";
  d = env_of(v);
  EXPECT_EQ(d.local_world_size, 3);
  EXPECT_EQ(d.world_size, 5);
  // The master cannot be derived from SLURM_JOB_NODELIST: it is required.
  v = base;
  v.erase("MASTER_ADDR");
  v["SLURM_JOB_NODELIST"] = "n[1-3]";
  EXPECT_EQ(env_error(v), "[dist] 6 processes (slurm) need MASTER_ADDR and MASTER_PORT: the host and a free TCP port "
                          "of rank 0 (Slurm: MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))");
  v = base;
  v["SLURM_PROCID"] = "6";
  EXPECT_EQ(env_error(v), "[dist] SLURM_PROCID=6 is not below SLURM_NTASKS=6");
  v = base;
  v.erase("SLURM_LOCALID");
  EXPECT_EQ(env_error(v), "[dist] SLURM_LOCALID is not set (srun sets it with SLURM_PROCID)");
}

// ---- sharding ----

// The trainer's single-process rule (src/train/trainer.cpp): a step takes up to `ga` micro-batches
// in order, never crossing an epoch end. Returns each step's (epoch, first, count).
std::vector<StepSlice> trainer_slices(int64_t bpe, int64_t ga, int64_t steps) {
  std::vector<StepSlice> out;
  int64_t used = 0, epoch = 0;
  for (int64_t s = 0; s < steps; ++s) {
    if (used >= bpe) {
      used = 0;
      ++epoch;
    }
    const int64_t k = std::min(ga, bpe - used);
    out.push_back({epoch, used, k});
    used += k;
  }
  return out;
}

TEST(Sharding, OneRankIsTheSingleProcessTrainer) {
  for (int64_t bpe : {1, 2, 5, 7, 12})
    for (int64_t ga : {1, 2, 3, 8}) {
      const ShardSpec spec{bpe, ga, 1};
      const int64_t per = steps_per_epoch(spec);
      const auto want = trainer_slices(bpe, ga, 3 * per);
      for (int64_t s = 0; s < 3 * per; ++s) {
        const StepSlice got = global_step_slice(spec, s);
        EXPECT_EQ(got.epoch, want[size_t(s)].epoch) << "bpe " << bpe << " ga " << ga << " step " << s;
        EXPECT_EQ(got.first, want[size_t(s)].first) << "bpe " << bpe << " ga " << ga << " step " << s;
        EXPECT_EQ(got.count, want[size_t(s)].count) << "bpe " << bpe << " ga " << ga << " step " << s;
      }
    }
}

TEST(Sharding, ShardsPartitionEveryEpochForWorldSizes1To8) {
  for (int w = 1; w <= 8; ++w)
    for (int64_t ga : {1, 2, 3})
      for (int64_t bpe : {1, 3, 7, 8, 16, 23, 50}) {
        const ShardSpec spec{bpe, ga, w};
        const int64_t per = steps_per_epoch(spec);
        EXPECT_EQ(per, (bpe + w * ga - 1) / (w * ga));
        // N ranks with ga take the same global steps as one rank with ga * N.
        const ShardSpec single{bpe, ga * w, 1};
        EXPECT_EQ(steps_per_epoch(single), per);
        for (int64_t epoch = 0; epoch < 2; ++epoch) {
          std::vector<int> seen(size_t(bpe), 0);
          for (int64_t j = 0; j < per; ++j) {
            const int64_t step = epoch * per + j;
            const StepSlice sl = global_step_slice(spec, step);
            const StepSlice one = global_step_slice(single, step);
            ASSERT_EQ(sl.epoch, epoch);
            ASSERT_EQ(sl.first, one.first);
            ASSERT_EQ(sl.count, one.count);
            ASSERT_GE(sl.count, 1);
            std::vector<int64_t> all;
            for (int r = 0; r < w; ++r) {
              const auto mine = rank_micro_batches(sl, w, r);
              // Rank r takes r, r+W, ...: at most ga of them, ascending, ceil((count - r) / W) in all.
              EXPECT_LE(int64_t(mine.size()), ga);
              EXPECT_EQ(int64_t(mine.size()), std::max<int64_t>(0, (sl.count - r + w - 1) / w));
              for (size_t i = 0; i < mine.size(); ++i) EXPECT_EQ(mine[i], sl.first + r + int64_t(i) * w);
              all.insert(all.end(), mine.begin(), mine.end());
            }
            std::sort(all.begin(), all.end());
            std::vector<int64_t> want(size_t(sl.count));
            std::iota(want.begin(), want.end(), sl.first);
            ASSERT_EQ(all, want) << "W " << w << " ga " << ga << " bpe " << bpe << " step " << step;
            for (int64_t m : all) ++seen[size_t(m)];
          }
          // Every micro-batch of the epoch exactly once, ragged tail included.
          for (int64_t m = 0; m < bpe; ++m) EXPECT_EQ(seen[size_t(m)], 1) << "W " << w << " bpe " << bpe << " mb " << m;
        }
      }
}

TEST(Sharding, RaggedTail) {
  // 10 micro-batches, 4 ranks, ga 2: steps of 8 then 2; in the tail ranks 2 and 3 compute nothing.
  const ShardSpec spec{10, 2, 4};
  ASSERT_EQ(steps_per_epoch(spec), 2);
  const StepSlice tail = global_step_slice(spec, 1);
  EXPECT_EQ(tail.first, 8);
  EXPECT_EQ(tail.count, 2);
  EXPECT_EQ(rank_micro_batches(tail, 4, 0), std::vector<int64_t>{8});
  EXPECT_EQ(rank_micro_batches(tail, 4, 1), std::vector<int64_t>{9});
  EXPECT_TRUE(rank_micro_batches(tail, 4, 2).empty());
  EXPECT_TRUE(rank_micro_batches(tail, 4, 3).empty());
  const StepSlice next = global_step_slice(spec, 2);  // the next epoch starts afresh
  EXPECT_EQ(next.epoch, 1);
  EXPECT_EQ(next.first, 0);
  EXPECT_EQ(rank_micro_batches(next, 4, 3), (std::vector<int64_t>{3, 7}));
}

// A dataset of n sequences of varied lengths with masked prompts (labels -100) of varied lengths.
data::TokenizedDataset make_dataset(int64_t n) {
  data::TokenizedDataset ds;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len = 3 + (i * 7) % 11, prompt = (i * 5) % len;
    for (int64_t t = 0; t < len; ++t) {
      ds.input_ids.push_back(int32_t(10 + t));
      ds.labels.push_back(t < prompt ? -100 : int32_t(10 + t));
    }
    ds.seq_offsets.push_back(int64_t(ds.input_ids.size()));
    ds.doc_lengths.push_back(int32_t(len));
    ds.seq_doc_offsets.push_back(int64_t(ds.doc_lengths.size()));
  }
  return ds;
}

TEST(Sharding, LossNormaliserCountsTheWholeGlobalStep) {
  const data::TokenizedDataset ds = make_dataset(29);
  data::BatchOptions bo;
  bo.micro_batch_size = 3;
  bo.seed = 11;
  data::BatchIterator it(ds, bo);
  const int64_t bpe = it.batches_per_epoch();  // 10, the last of 2 sequences
  ASSERT_EQ(bpe, 10);
  for (int w : {1, 3, 4}) {
    const ShardSpec spec{bpe, 2, w};
    for (int64_t step = 0; step < 2 * steps_per_epoch(spec); ++step) {
      const StepSlice sl = global_step_slice(spec, step);
      const auto order = data::epoch_order(ds.size(), bo.seed, sl.epoch, true);
      // The padded batches the ranks build (BatchIterator) count the same tokens.
      int64_t from_batches = 0;
      Batch b;
      for (int64_t m = sl.first; m < sl.first + sl.count; ++m) {
        it.seek(sl.epoch, m);
        ASSERT_EQ(it.order(), order);
        it.next(b);
        from_batches += b.predicted_tokens();
        EXPECT_EQ(micro_batch_predicted_tokens(ds, order, bo.micro_batch_size, m), b.predicted_tokens());
      }
      EXPECT_GT(from_batches, 0);
      EXPECT_EQ(step_predicted_tokens(ds, order, bo.micro_batch_size, sl), from_batches) << "W " << w << " step " << step;
    }
  }
}

// ---- data parallelism reproduces the single-process step (CPU decoder, float64) ----

constexpr const char* kDistTinyConfig = R"({"model_type": "qwen3_moe", "vocab_size": 40, "hidden_size": 8,
  "intermediate_size": 12, "moe_intermediate_size": 6, "num_hidden_layers": 2, "num_attention_heads": 2,
  "num_key_value_heads": 1, "head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": true,
  "mlp_only_layers": [0], "output_router_logits": true, "router_aux_loss_coef": 0.02, "rope_theta": 10000.0})";

// Sum of |a - b| and of |b| over every LoRA tensor.
void accumulate_diff(const LoraAdapter& a, const LoraAdapter& b, double& diff, double& norm) {
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (size_t k = 0; k < a.layers[l].slot.size(); ++k) {
      const auto& pa = a.layers[l].slot[k];
      const auto& pb = b.layers[l].slot[k];
      if (!pa.present()) continue;
      for (const auto& [ta, tb] : {std::pair{&pa.A, &pb.A}, std::pair{&pa.B, &pb.B}})
        for (int64_t i = 0; i < ta->numel(); ++i) {
          diff += std::fabs(ta->data<double>()[i] - tb->data<double>()[i]);
          norm += std::fabs(tb->data<double>()[i]);
        }
    }
}

void add_into(LoraAdapter& sum, const LoraAdapter& g) {
  for (size_t l = 0; l < sum.layers.size(); ++l)
    for (size_t k = 0; k < sum.layers[l].slot.size(); ++k) {
      auto& ps = sum.layers[l].slot[k];
      const auto& pg = g.layers[l].slot[k];
      if (!ps.present()) continue;
      for (int64_t i = 0; i < ps.A.numel(); ++i) ps.A.data<double>()[i] += pg.A.data<double>()[i];
      for (int64_t i = 0; i < ps.B.numel(); ++i) ps.B.data<double>()[i] += pg.B.data<double>()[i];
    }
}

TEST(DataParallel, RanksReproduceTheSingleProcessStepWithTheSameGlobalBatch) {
  const ModelConfig cfg = parse_hf_config_json(kDistTinyConfig, "test");
  const ModelWeights w = random_model_weights(cfg, DType::F64, 3, 0.3);
  LoraConfig lc;
  lc.r = 2;
  lc.alpha = 4;
  lc.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  LoraAdapter lora = init_lora(cfg, lc, DType::F64, 11);
  for (auto& layer : lora.layers)  // B away from zero so every A has a gradient
    for (auto& p : layer.slot)
      for (int64_t i = 0; i < p.B.numel(); ++i) p.B.data<double>()[i] = 0.1 * std::sin(double(i) + 1.0);
  QwenDecoder<double> dec(w, &lora);
  const data::TokenizedDataset ds = make_dataset(23);
  data::BatchOptions bo;
  bo.micro_batch_size = 2;
  bo.seed = 5;
  const double p_drop = 0.2;
  const uint64_t seed = 9;
  data::BatchIterator single(ds, bo), ranks(ds, bo);
  const int64_t bpe = single.batches_per_epoch();  // 12
  for (int world : {2, 3, 5}) {
    const int64_t ga = 2;
    // The single process runs the trainer's loop with ga * world; the ranks shard with ga.
    const ShardSpec spec{bpe, ga, world};
    single.seek(0, 0);
    for (int64_t step = 0; step < steps_per_epoch(spec) + 1; ++step) {
      const StepSlice sl = global_step_slice(spec, step);
      // Single process: micro-batches in order, N counted from the batches, dropout index i.
      std::vector<Batch> micro(size_t(sl.count));
      int64_t n_single = 0;
      for (auto& b : micro) {
        single.next(b);
        n_single += b.predicted_tokens();
      }
      LoraAdapter g_single = lora.zeros_like();
      double loss_single = 0;
      for (size_t i = 0; i < micro.size(); ++i)
        loss_single += dec.forward_backward(micro[i], &g_single, false, 1.0 / double(n_single),
                                            LoraDropout{p_drop, seed, step, int64_t(i)}).loss_sum;
      // Ranks: N without communication, own micro-batches, dropout index within the global step.
      LoraAdapter g_sum = lora.zeros_like();
      double loss_sum = 0;
      for (int r = 0; r < world; ++r) {
        const RankStep mine = load_rank_step(ranks, ds, bo.micro_batch_size, spec, r, step);
        ASSERT_EQ(mine.predicted_tokens, n_single);
        ASSERT_EQ(mine.batches.size(), rank_micro_batches(sl, world, r).size());
        LoraAdapter g_rank = lora.zeros_like();  // a rank without micro-batches contributes zeros
        for (size_t i = 0; i < mine.batches.size(); ++i)
          loss_sum += dec.forward_backward(mine.batches[i], &g_rank, false, 1.0 / double(mine.predicted_tokens),
                                           LoraDropout{p_drop, seed, step, mine.micro_index[i]}).loss_sum;
        add_into(g_sum, g_rank);  // the all-reduce
      }
      double diff = 0, norm = 0;
      accumulate_diff(g_sum, g_single, diff, norm);
      ASSERT_GT(norm, 0);
      EXPECT_LT(diff / norm, 1e-13) << "W " << world << " step " << step;
      EXPECT_NEAR(loss_sum, loss_single, 1e-12 * std::fabs(loss_single)) << "W " << world << " step " << step;
    }
  }
}

// ---- gradient buckets ----

// The LoRA tensors of `layers` layers, 4 per layer with the given sizes, packed in layer order with
// `gap` elements of padding after each.
std::vector<GradTensor> lora_layout(int layers, std::vector<int64_t> sizes, int64_t gap) {
  std::vector<GradTensor> t;
  int64_t off = 0;
  for (int l = 0; l < layers; ++l)
    for (int64_t s : sizes) {
      t.push_back({off, s, l});
      off += s + gap;
    }
  return t;
}

void expect_valid_plan(const std::vector<GradTensor>& tensors, const std::vector<GradBucket>& plan, int64_t bucket_bytes) {
  ASSERT_FALSE(plan.empty());
  const int64_t begin = tensors.front().offset, end = tensors.back().offset + tensors.back().size;
  // Reverse order, contiguous, covering [begin, end) once; boundaries only between tensors.
  EXPECT_EQ(plan.front().offset + plan.front().size, end);
  EXPECT_EQ(plan.back().offset, begin);
  int64_t count = 0;
  for (size_t k = 0; k < plan.size(); ++k) {
    const GradBucket& b = plan[k];
    if (k > 0) {
      EXPECT_EQ(b.offset + b.size, plan[k - 1].offset) << "bucket " << k;
      EXPECT_LE(b.ready_layer, plan[k - 1].ready_layer) << "bucket " << k;
    }
    if (k + 1 < plan.size()) {
      EXPECT_GE(b.size * 4, bucket_bytes) << "bucket " << k;
    }
    int lo = 1 << 30, hi = -1;
    int64_t in = 0;
    for (const auto& t : tensors) {
      const bool inside = t.offset >= b.offset && t.offset + t.size <= b.offset + b.size;
      const bool outside = t.offset + t.size <= b.offset || t.offset >= b.offset + b.size;
      EXPECT_TRUE(inside || outside) << "tensor at " << t.offset << " split by bucket " << k;
      if (inside) {
        lo = std::min(lo, t.layer);
        hi = std::max(hi, t.layer);
        ++in;
      }
    }
    EXPECT_EQ(b.ready_layer, lo);
    EXPECT_EQ(b.max_layer, hi);
    EXPECT_EQ(b.tensors, in);
    count += in;
  }
  EXPECT_EQ(count, int64_t(tensors.size()));
  // Walking the backward from the last layer to the first releases every bucket once, in plan order.
  size_t next = 0;
  for (int l = tensors.back().layer; l >= 0; --l) {
    const auto [b, e] = buckets_ready_after(plan, l);
    if (b == e) continue;
    EXPECT_EQ(b, next) << "layer " << l;
    for (size_t k = b; k < e; ++k) EXPECT_EQ(plan[k].ready_layer, l);
    next = e;
  }
  EXPECT_EQ(next, plan.size());
}

TEST(GradBuckets, PlansCoverTheBufferInReverseLayerOrder) {
  for (int64_t gap : {0, 3})
    for (int64_t bytes : {1, 64, 1000, 4096, 1 << 20}) {
      const auto t = lora_layout(6, {64, 96, 32, 200}, gap);
      expect_valid_plan(t, plan_grad_buckets(t, bytes), bytes);
    }
  // One byte: one tensor per bucket. Everything: one bucket, ready after layer 0.
  const auto t = lora_layout(3, {10, 20}, 0);
  EXPECT_EQ(plan_grad_buckets(t, 1).size(), t.size());
  const auto all = plan_grad_buckets(t, 1 << 30);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].offset, 0);
  EXPECT_EQ(all[0].size, 90);
  EXPECT_EQ(all[0].ready_layer, 0);
  EXPECT_EQ(all[0].max_layer, 2);
}

TEST(GradBuckets, ExampleLayout) {
  // Layers of 100 elements (400 bytes) as two tensors of 50; buckets of 600 bytes close at 150 elements:
  // [200, 400) = layers 2-3 part, ... exact boundaries below.
  const auto t = lora_layout(4, {50, 50}, 0);
  const auto plan = plan_grad_buckets(t, 600);
  ASSERT_EQ(plan.size(), 3u);
  EXPECT_EQ(plan[0].offset, 250);  // 3 tensors: layer 3 (two) + the upper half of layer 2
  EXPECT_EQ(plan[0].size, 150);
  EXPECT_EQ(plan[0].ready_layer, 2);
  EXPECT_EQ(plan[1].offset, 100);
  EXPECT_EQ(plan[1].size, 150);
  EXPECT_EQ(plan[1].ready_layer, 1);
  EXPECT_EQ(plan[2].offset, 0);
  EXPECT_EQ(plan[2].size, 100);  // the rest (smaller than a bucket)
  EXPECT_EQ(plan[2].ready_layer, 0);
  EXPECT_EQ(buckets_ready_after(plan, 3), (std::pair<size_t, size_t>{0, 0}));
  EXPECT_EQ(buckets_ready_after(plan, 2), (std::pair<size_t, size_t>{0, 1}));
  EXPECT_EQ(buckets_ready_after(plan, 0), (std::pair<size_t, size_t>{2, 3}));
}

TEST(GradBucketsDeathTest, BrokenLayoutsAreInvariantFailures) {
  EXPECT_DEATH(plan_grad_buckets({{0, 10, 0}, {5, 10, 0}}, 64), "overlap");
  EXPECT_DEATH(plan_grad_buckets({{0, 10, 1}, {10, 10, 0}}, 64), "layers in order");
}

}  // namespace
}  // namespace qt::dist
