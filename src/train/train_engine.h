// Where a training step runs: the trainer's loop (trainer.cpp) is the same for every engine.
// One optimizer step over micro-batches b_1..b_k with N predicted tokens in all:
//   begin_step(k)                                zero the gradients and the step's loss total
//   accumulate(b_i, 1/N, dropout of (step, i))   grads += d(loss_sum_i / N); loss total += loss_sum_i
//                                                (+ count_i * coef * aux_i for MoE with router logits)
//   finish_step(lr, max_grad_norm)               norm, clip, and AdamW unless the loss total or the
//                                                norm is not finite (then nothing changes)
// Engines:
//  - cpu:  the exact reference (model/decoder.h in fp32 on the host; AdamW in train/optimizer.h);
//          the adapter and optimizer the trainer holds ARE the engine's state.
//  - cuda: model/cuda_decoder.h (bf16 weights and activations, fp32 LoRA masters, gradients and AdamW
//          moments on the GPU); accumulate() only queues work and finish_step() synchronises once to
//          read the loss and the norm. The host adapter and optimizer are brought up to date by
//          sync_to_host() (checkpoints, the final save) and pushed back by load_from_host() (resume).
// Data parallelism (docs/distributed.md): with a DataParallel group of W ranks, each rank
// accumulates its own micro-batches (k may be 0 on some ranks in an epoch's ragged tail; N is the
// whole global step's count on every rank) and finish_step sums the gradients and the loss totals
// over the ranks before the norm, the guard and AdamW, so every rank takes the same update:
//  - cuda: NCCL, the gradient buckets all-reduced on a side stream during the backward of the
//          step's last micro-batch (dist/nccl_grad_sync.h), the loss total after it;
//  - cpu:  the rendezvous' TCP all-gather of the flat gradients, summed in rank order in float64
//          (slow, exact and identical on every rank: for tests and small models).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/tokenized_dataset.h"
#include "model/decoder.h"
#include "model/lora.h"
#include "model/weights.h"
#include "train/evaluate.h"
#include "train/optimizer.h"

namespace qt {

namespace dist {
class Rendezvous;
}

// The data-parallel group a training engine belongs to (default: one process).
struct DataParallel {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;                // the GPU (among the visible ones) of a CUDA rank
  dist::Rendezvous* rv = nullptr;    // joined by every rank: NCCL's set-up, the CPU engine's sums
  bool force_collectives = false;    // tests: the collective path even with world_size 1
  int64_t bucket_bytes = int64_t(25) << 20;  // CUDA: gradient all-reduce bucket (PyTorch DDP's default)
  bool collective() const { return world_size > 1 || force_collectives; }
};

struct EngineStepStats {
  double loss_sum = 0;   // over the step's micro-batches (aux terms included)
  double grad_norm = 0;  // before clipping; NaN/inf when a gradient is not finite
  bool applied = false;  // false: the step was skipped (non-finite loss or gradients)
};

class TrainEngine {
 public:
  virtual ~TrainEngine() = default;
  virtual std::string describe() const = 0;  // "cpu" or "cuda (<GPU name>)"
  // micro_batches: how many accumulate() calls this rank makes in the step (the last one's backward
  // overlaps the gradient all-reduce); 0 is valid for a rank without data in a ragged tail step.
  virtual void begin_step(int64_t micro_batches) = 0;
  virtual void accumulate(const Batch& b, double grad_scale, const LoraDropout& dropout) = 0;
  virtual EngineStepStats finish_step(double lr, double max_grad_norm) = 0;
  // Loss over a dataset without gradients (train/evaluate.h).
  virtual EvalResult evaluate(const data::TokenizedDataset& ds, int64_t micro_batch_size, int32_t pad_id) = 0;
  virtual void sync_to_host(LoraAdapter& lora, AdamW& opt) = 0;
  virtual void load_from_host(const LoraAdapter& lora, const AdamW& opt) = 0;
  // v := the element-wise sum of v over the ranks (in rank order: the same on every rank); a no-op
  // on one process. Synchronising: for a few numbers per step (tokens, stop requests).
  virtual void sum_over_ranks(std::vector<double>& v) = 0;
  // MoE models: per MoE layer, the (token, expert) assignments each expert received in the training
  // micro-batches of this rank since the last call (then reset); empty for dense models.
  virtual std::vector<std::vector<int64_t>> take_expert_load() = 0;
};

// "auto" -> "cuda" when this build has the CUDA backend and a GPU is visible, else "cpu"; "cpu" and
// "cuda" are returned as they are after checking that they can run ("[context] ..." errors
// otherwise). `why` gets a note when auto picked the CPU. The choice does not depend on the model:
// callers resolve the device first so that the weights are loaded for their engine
// (model_source.h weights_for).
std::string resolve_device(const std::string& device, const std::string& context, std::string* why = nullptr);

// The engines. The CPU one trains `lora` in place with `opt`; the CUDA one copies the weights and
// the adapter to GPU dp.local_rank (joining the group's NCCL communicator when dp.collective()) and
// keeps its own optimizer states (AdamW's settings from `opt`).
std::unique_ptr<TrainEngine> make_cpu_engine(const ModelWeights& w, LoraAdapter& lora, AdamW& opt,
                                             const DataParallel& dp = {});
// What the CUDA engine keeps in pinned host memory instead of on the GPU (model/cuda_decoder.h).
struct CudaOffload {
  bool embeddings = false;    // the input embedding table (see resolve_embeddings_on_host)
  bool layer_inputs = false;  // the saved layer inputs of the training forward (offload_activations)
  bool lora_states = false;   // LoRA masters, gradients and AdamW moments (offload_lora; one GPU only)
  int64_t expert_chunk = 0;   // NF4 MoE experts dequantized this many at a time (nf4_expert_chunk; 0: a layer's)
};
std::unique_ptr<TrainEngine> make_cuda_engine(const ModelWeights& w, const LoraAdapter& lora, const AdamW& opt,
                                              const DataParallel& dp = {}, const CudaOffload& offload = {});
// `qwentune bench`: the CUDA engine on random weights of cfg's shape made on the device (CudaDecoder's
// random constructor; load_in_4bit: NF4 on the device), AdamW with torch's defaults.
std::unique_ptr<TrainEngine> make_cuda_bench_engine(const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed,
                                                    bool load_in_4bit, const DataParallel& dp = {},
                                                    const CudaOffload& offload = {});
// Where the CUDA engine keeps the input embedding table: the user's choice (offload_embeddings),
// else in host memory for a 4-bit base (QLoRA: memory first; only the looked-up rows cross the bus,
// N x H x 2 bytes per forward). Never for tied embeddings: they are also the lm_head, which the
// GPU multiplies with.
bool resolve_embeddings_on_host(std::optional<bool> requested, const ModelConfig& cfg, bool four_bit);

}  // namespace qt
