// The CPU training engine and the device choice (see train_engine.h); the CUDA engine is in
// train_engine_cuda.cpp.
#include "train/train_engine.h"

#include <cmath>

#include "core/error.h"
#ifdef QT_HAVE_CUDA
#include "ops/cuda/runtime.h"
#endif

namespace qt {

namespace {

[[maybe_unused]] bool has_moe_layers(const ModelConfig& cfg) {
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l)
    if (cfg.is_moe_layer(l)) return true;
  return false;
}

void zero_grads(LoraAdapter& g) {
  for (auto& layer : g.layers)
    for (auto& p : layer.slot)
      if (p.present()) {
        std::fill_n(p.A.data<float>(), p.A.numel(), 0.f);
        std::fill_n(p.B.data<float>(), p.B.numel(), 0.f);
      }
}

class CpuEngine final : public TrainEngine {
 public:
  CpuEngine(const ModelWeights& w, LoraAdapter& lora, AdamW& opt)
      : lora_(lora), opt_(opt), grads_(lora.zeros_like()), dec_(w, &lora) {}
  std::string describe() const override { return "cpu"; }
  void begin_step() override {
    zero_grads(grads_);
    loss_sum_ = 0;
  }
  void accumulate(const Batch& b, double grad_scale, const LoraDropout& dropout) override {
    const StepResult r = dec_.forward_backward(b, &grads_, false, grad_scale, dropout);
    loss_sum_ += r.loss_sum + double(r.count) * r.aux_coef * r.aux_loss;
  }
  EngineStepStats finish_step(double lr, double max_grad_norm) override {
    EngineStepStats st;
    st.loss_sum = loss_sum_;
    st.grad_norm = max_grad_norm > 0 ? clip_grad_norm(grads_, max_grad_norm) : grad_global_norm(grads_);
    st.applied = std::isfinite(loss_sum_) && std::isfinite(st.grad_norm) && grads_all_finite(grads_);
    if (st.applied) opt_.step(lora_, grads_, lr);
    return st;
  }
  EvalResult evaluate(const data::TokenizedDataset& ds, int64_t micro_batch_size, int32_t pad_id) override {
    return evaluate_dataset(dec_, ds, micro_batch_size, pad_id);
  }
  void sync_to_host(LoraAdapter&, AdamW&) override {}    // the trainer's objects are the state
  void load_from_host(const LoraAdapter&, const AdamW&) override {}

 private:
  LoraAdapter& lora_;
  AdamW& opt_;
  LoraAdapter grads_;
  QwenDecoder<float> dec_;
  double loss_sum_ = 0;
};

}  // namespace

std::string resolve_device(const std::string& device, const ModelConfig& cfg, const std::string& context,
                           std::string* why) {
  if (device != "auto" && device != "cpu" && device != "cuda")
    fail(context, "device '{}': use auto, cpu or cuda", device);
  if (device == "cpu") return device;
#ifdef QT_HAVE_CUDA
  const bool gpu = cuda::device_count() > 0;
  const bool moe = has_moe_layers(cfg);
  if (device == "cuda") {
    if (!gpu) fail(context, "device cuda: no CUDA device is visible (use --device cpu)");
    if (moe) fail(context, "device cuda: the CUDA engine does not run Qwen3-MoE layers yet (use --device cpu)");
    return device;
  }
  if (gpu && !moe) return "cuda";
  if (why) *why = gpu ? "the CUDA engine does not run MoE layers yet" : "no CUDA device is visible";
  return "cpu";
#else
  (void)cfg;
  (void)why;
  if (device == "cuda") fail(context, "device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
  return "cpu";
#endif
}

std::unique_ptr<TrainEngine> make_cpu_engine(const ModelWeights& w, LoraAdapter& lora, AdamW& opt) {
  return std::make_unique<CpuEngine>(w, lora, opt);
}

}  // namespace qt
