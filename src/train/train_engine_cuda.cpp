// The CUDA training engine (see train_engine.h): model/cuda_decoder.h behind the trainer's loop.
// Per optimizer step: zero_grads, then per micro-batch set_batch (queued pinned upload) and
// forward_backward (queued), then optimizer_step (norm, guard, clip, AdamW on the device) and one
// synchronisation to read the loss total, the norm and whether the guard skipped the update.
// A QLoRA base (ModelWeights::nf4) stays in NF4 on the device (model/cuda_decoder.h).
#include "train/train_engine.h"

#include "core/error.h"

#ifdef QT_HAVE_CUDA
#include <cuda_runtime.h>

#include "model/cuda_decoder.h"
#include "ops/cuda/check.h"

namespace qt {

namespace {

std::string gpu_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  QT_CUDA_CHECK(cudaGetDevice(&dev));
  QT_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return prop.name;
}

class CudaEngine final : public TrainEngine {
 public:
  CudaEngine(const ModelWeights& w, const LoraAdapter& lora, const AdamW& opt)
      : cfg_(opt.config()), dec_(ctx_, w, lora), steps_(opt.step_count()), nf4_(w.nf4 != nullptr) {
    if (steps_ > 0) load_from_host(lora, opt);  // a resumed run: AdamW's moments too
  }
  std::string describe() const override {
    return "cuda (" + gpu_name() + (nf4_ ? ", NF4 base weights on the device" : "") + ")";
  }
  void begin_step() override { dec_.zero_grads(); }
  void accumulate(const Batch& b, double grad_scale, const LoraDropout& dropout) override {
    dec_.set_batch(b);
    dec_.forward_backward(grad_scale, dropout);
  }
  EngineStepStats finish_step(double lr, double max_grad_norm) override {
    dec_.optimizer_step(steps_ + 1, lr, cfg_.weight_decay, max_grad_norm, cfg_.beta1, cfg_.beta2, cfg_.eps);
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

 private:
  AdamWConfig cfg_;
  cuda::Context ctx_;
  CudaDecoder dec_;
  int64_t steps_ = 0;
  bool nf4_ = false;  // QLoRA: the projections are kept in NF4 on the GPU
};

}  // namespace

std::unique_ptr<TrainEngine> make_cuda_engine(const ModelWeights& w, const LoraAdapter& lora, const AdamW& opt) {
  return std::make_unique<CudaEngine>(w, lora, opt);
}

}  // namespace qt

#else

namespace qt {
std::unique_ptr<TrainEngine> make_cuda_engine(const ModelWeights&, const LoraAdapter&, const AdamW&) {
  fail("train", "device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
}
}  // namespace qt

#endif
