// The CUDA training engine (see train_engine.h): model/cuda_decoder.h behind the trainer's loop.
// Per optimizer step: zero_grads, then per micro-batch set_batch (queued pinned upload) and
// forward_backward (queued), then optimizer_step (norm, guard, clip, AdamW on the device) and one
// synchronisation to read the loss total, the norm and whether the guard skipped the update.
// In a data-parallel group (DataParallel::collective()) the engine joins the NCCL communicator on
// GPU local_rank; during the backward of the rank's last micro-batch of a step, each layer's
// finished gradient buckets are all-reduced on a side stream (dist::GradAllReducer); a rank
// without micro-batches all-reduces its zero gradients in finish_step. Then the loss total is
// summed, and the norm, the guard and AdamW see the same numbers on every rank. The host waits on
// the communicator with a timeout that polls NCCL's asynchronous errors (a dead peer ends the job).
// A QLoRA base (ModelWeights::nf4) stays in NF4 on the device (model/cuda_decoder.h).
#include "train/train_engine.h"

#include "core/error.h"

#ifdef QT_HAVE_CUDA
#include <cuda_runtime.h>

#include "dist/nccl_grad_sync.h"
#include "dist/nccl_rendezvous.h"
#include "model/cuda_decoder.h"
#include "ops/cuda/check.h"

namespace qt {

namespace {

// How long a rank waits for a collective: rank 0 may be evaluating or saving a checkpoint meanwhile.
constexpr double kCollectiveTimeoutS = 3600;

// Selects GPU `local_rank` before anything is made on a device (the communicator and the context).
int select_device(const DataParallel& dp) {
  if (!dp.collective()) return 0;
  int n = 0;
  QT_CUDA_CHECK(cudaGetDeviceCount(&n));
  if (dp.local_rank >= n)
    fail("train", "rank {} has local rank {} but only {} CUDA device(s) are visible", dp.rank, dp.local_rank, n);
  QT_CUDA_CHECK(cudaSetDevice(dp.local_rank));
  return dp.local_rank;
}

CudaDecoderOptions decoder_options(const CudaOffload& off, const DataParallel& dp) {
  if (off.lora_states && dp.collective())
    fail("train", "offload_lora works on one GPU only: the gradients of a data-parallel step are all-reduced on the GPU");
  return {.training = true,
          .embeddings_on_host = off.embeddings,
          .layer_inputs_on_host = off.layer_inputs,
          .lora_states_on_host = off.lora_states,
          .nf4_expert_chunk = off.expert_chunk};
}

std::unique_ptr<dist::NcclComm> join_comm(const DataParallel& dp, int device) {
  if (!dp.collective()) return nullptr;
  QT_ASSERT(dp.rv, "a data-parallel CUDA engine needs the rendezvous");
  return dist::nccl_from_rendezvous(*dp.rv, device);
}

class CudaEngine final : public TrainEngine {
 public:
  CudaEngine(const ModelWeights& w, const LoraAdapter& lora, const AdamW& opt, const DataParallel& dp,
             const CudaOffload& off)
      : device_(select_device(dp)), comm_(join_comm(dp, device_)), cfg_(opt.config()),
        dec_(ctx_, w, lora, decoder_options(off, dp)),
        steps_(opt.step_count()), nf4_(w.nf4 != nullptr), aux_coef_(w.cfg.output_router_logits ? w.cfg.router_aux_loss_coef : 0.0) {
    if (steps_ > 0) load_from_host(lora, opt);  // a resumed run: AdamW's moments too
    plan_buckets(dp);
  }
  CudaEngine(const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed, bool load_in_4bit, const DataParallel& dp,
             const CudaOffload& off)
      : device_(select_device(dp)), comm_(join_comm(dp, device_)),
        dec_(ctx_, cfg, lcfg, seed, load_in_4bit, decoder_options(off, dp)),
        nf4_(load_in_4bit), aux_coef_(cfg.output_router_logits ? cfg.router_aux_loss_coef : 0.0) {
    plan_buckets(dp);
  }
  std::string describe() const override {
    return "cuda (" + cuda::current_device_name() + (nf4_ ? ", NF4 base weights on the device" : "") +
           (dec_.embeddings_on_host() ? ", input embeddings in host memory" : "") +
           (dec_.layer_inputs_on_host() ? ", saved layer inputs in host memory" : "") +
           (dec_.lora_states_on_host() ? ", LoRA states in host memory" : "") +
           (comm_ ? fmt::format(", GPU {}, NCCL rank {} of {}, {} gradient buckets", device_, comm_->rank(),
                                comm_->world_size(), reducer_->plan().size())
                  : std::string()) +
           ")";
  }
  void begin_step(int64_t micro_batches) override {
    QT_ASSERT(micro_batches >= 0, "micro-batches {}", micro_batches);
    dec_.zero_grads();
    planned_ = micro_batches, done_ = 0;
  }
  void accumulate(const Batch& b, double grad_scale, const LoraDropout& dropout) override {
    QT_ASSERT(done_ < planned_, "accumulate() called more often than begin_step() announced ({})", planned_);
    const bool last = ++done_ == planned_;
    dec_.set_batch(b);
    if (reducer_ && last)
      dec_.set_layer_backward_hook([this](int64_t l) { reducer_->layer_done(int(l), ctx_.stream()); });
    dec_.forward_backward(grad_scale, dropout);
    dec_.set_layer_backward_hook({});
  }
  EngineStepStats finish_step(double lr, double max_grad_norm) override {
    if (reducer_) {
      QT_ASSERT(done_ == planned_, "finish_step after {} of {} micro-batches", done_, planned_);
      reducer_->finish(ctx_.stream());  // launches the buckets of a rank without micro-batches
      comm_->all_reduce_sum(dec_.loss_total_data(), 1, ctx_.stream());
    }
    dec_.optimizer_step(steps_ + 1, lr, cfg_.weight_decay, max_grad_norm, cfg_.beta1, cfg_.beta2, cfg_.eps);
    if (comm_) comm_->synchronize(ctx_.stream(), kCollectiveTimeoutS);
    const CudaDecoder::StepStats s = dec_.read_step_stats();
    if (!s.skipped) ++steps_;
    return {s.loss_total, s.grad_norm, !s.skipped};
  }
  EvalResult evaluate(const data::TokenizedDataset& ds, int64_t micro_batch_size, int32_t pad_id) override {
    return evaluate_dataset(
        [&](const Batch& b) {
          dec_.set_batch(b);
          dec_.forward();
          StepResult r;
          r.loss_sum = dec_.loss_sum();
          r.count = dec_.count();
          if (aux_coef_ != 0) r.aux_loss = dec_.aux_loss(), r.aux_coef = aux_coef_;
          return r;
        },
        ds, micro_batch_size, pad_id);
  }
  void sync_to_host(LoraAdapter& lora, AdamW& opt) override {
    const LoraConfig keep = lora.cfg;
    lora = dec_.download_lora();
    lora.cfg = keep;
    const auto [m, v] = dec_.download_moments();
    opt.set_moments(m, v, steps_);
  }
  void load_from_host(const LoraAdapter& lora, const AdamW& opt) override {
    const auto [m, v] = opt.moments(lora);
    dec_.upload_state(lora, m, v);
    steps_ = opt.step_count();
  }
  void sum_over_ranks(std::vector<double>& v) override {
    if (!comm_) return;
    ctx_.synchronize();
    if (small_.size() < v.size()) small_ = cuda::Buffer<double>(v.size());
    small_.upload(v);
    comm_->all_reduce_sum(small_.get(), v.size(), ctx_.stream());
    comm_->synchronize(ctx_.stream(), kCollectiveTimeoutS);
    const std::vector<double> all = small_.download();
    std::copy_n(all.begin(), v.size(), v.begin());
  }
  std::vector<std::vector<int64_t>> take_expert_load() override { return dec_.take_expert_load(); }

 private:
  void plan_buckets(const DataParallel& dp) {
    if (!comm_) return;
    std::vector<dist::GradTensor> tensors;
    for (const auto& g : dec_.grad_layout()) tensors.push_back({g.offset, g.size, int(g.layer)});
    reducer_ = std::make_unique<dist::GradAllReducer>(*comm_, dec_.grad_data(),
                                                      dist::plan_grad_buckets(tensors, dp.bucket_bytes));
  }
  int device_ = 0;
  std::unique_ptr<dist::NcclComm> comm_;  // before the context: joining selects the device
  AdamWConfig cfg_;
  cuda::Context ctx_;
  CudaDecoder dec_;
  int64_t steps_ = 0;
  bool nf4_ = false;  // QLoRA: the projections are kept in NF4 on the GPU
  double aux_coef_ = 0;  // router_aux_loss_coef when the loss includes the router aux loss
  std::unique_ptr<dist::GradAllReducer> reducer_;
  cuda::Buffer<double> small_;
  int64_t planned_ = 0, done_ = 0;
};

}  // namespace

std::unique_ptr<TrainEngine> make_cuda_bench_engine(const ModelConfig& cfg, const LoraConfig& lcfg, uint64_t seed,
                                                    bool load_in_4bit, const DataParallel& dp, const CudaOffload& offload) {
  return std::make_unique<CudaEngine>(cfg, lcfg, seed, load_in_4bit, dp, offload);
}

std::unique_ptr<TrainEngine> make_cuda_engine(const ModelWeights& w, const LoraAdapter& lora, const AdamW& opt,
                                              const DataParallel& dp, const CudaOffload& offload) {
  return std::make_unique<CudaEngine>(w, lora, opt, dp, offload);
}

}  // namespace qt

#else

namespace qt {
std::unique_ptr<TrainEngine> make_cuda_bench_engine(const ModelConfig&, const LoraConfig&, uint64_t, bool,
                                                    const DataParallel&, const CudaOffload&) {
  fail("bench", "device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
}
std::unique_ptr<TrainEngine> make_cuda_engine(const ModelWeights&, const LoraAdapter&, const AdamW&,
                                              const DataParallel&, const CudaOffload&) {
  fail("train", "device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
}
}  // namespace qt

#endif
