// The CPU training engine and the device choice (see train_engine.h); the CUDA engine is in
// train_engine_cuda.cpp.
#include "train/train_engine.h"

#include <cmath>
#include <cstring>
#include <string>

#include "core/error.h"
#include "dist/rendezvous.h"
#ifdef QT_HAVE_CUDA
#include "ops/cuda/runtime.h"
#endif

namespace qt {

namespace {


// Calls f(pointer, count) for every gradient array of `g` in a fixed order (layers, slots, A then B).
template <typename F>
void for_each_grad_array(LoraAdapter& g, F&& f) {
  for (auto& layer : g.layers)
    for (auto& p : layer.slot)
      if (p.present()) f(p.A.data<float>(), p.A.numel()), f(p.B.data<float>(), p.B.numel());
}

// v := the sum over the ranks of v, through the rendezvous (every rank's bytes to every rank, then
// summed in rank order in float64, so every rank computes the same sums).
template <typename T>
void rendezvous_sum(dist::Rendezvous& rv, std::vector<T>& v) {
  const std::string mine(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  const std::vector<std::string> all = rv.all_gather(mine);
  for (size_t r = 0; r < all.size(); ++r)
    QT_ASSERT(all[r].size() == mine.size(), "rank {} sent {} bytes to the sum, this rank {}", r, all[r].size(),
              mine.size());
  std::vector<double> acc(v.size(), 0.0);
  std::vector<T> part(v.size());
  for (const std::string& blob : all) {
    std::memcpy(part.data(), blob.data(), blob.size());
    for (size_t i = 0; i < v.size(); ++i) acc[i] += double(part[i]);
  }
  for (size_t i = 0; i < v.size(); ++i) v[i] = T(acc[i]);
}

class CpuEngine final : public TrainEngine {
 public:
  CpuEngine(const ModelWeights& w, LoraAdapter& lora, AdamW& opt, const DataParallel& dp)
      : lora_(lora), opt_(opt), grads_(lora.zeros_like()), dec_(w, &lora), dp_(dp), experts_(w.cfg.num_experts) {
    QT_ASSERT(!dp.collective() || dp.rv, "a data-parallel CPU engine needs the rendezvous");
  }
  std::string describe() const override { return "cpu"; }
  void begin_step(int64_t) override {
    for_each_grad_array(grads_, [](float* p, int64_t n) { std::fill_n(p, n, 0.f); });
    loss_sum_ = 0;
  }
  void accumulate(const Batch& b, double grad_scale, const LoraDropout& dropout) override {
    const StepResult r = dec_.forward_backward(b, &grads_, false, grad_scale, dropout);
    loss_sum_ += r.loss_sum + double(r.count) * r.aux_coef * r.aux_loss;
    if (load_.size() < r.expert_load.size()) load_.resize(r.expert_load.size(), 0);
    for (size_t i = 0; i < r.expert_load.size(); ++i) load_[i] += r.expert_load[i];
  }
  EngineStepStats finish_step(double lr, double max_grad_norm) override {
    if (dp_.collective()) all_reduce_grads();
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
  void sum_over_ranks(std::vector<double>& v) override {
    if (dp_.collective()) rendezvous_sum(*dp_.rv, v);
  }
  std::vector<std::vector<int64_t>> take_expert_load() override {
    std::vector<std::vector<int64_t>> out;
    const int64_t E = experts_;
    for (size_t at = 0; E > 0 && at < load_.size(); at += size_t(E))
      out.emplace_back(load_.begin() + int64_t(at), load_.begin() + int64_t(at) + E);
    load_.clear();
    return out;
  }

 private:
  // The flat gradients and the loss total summed over the ranks.
  void all_reduce_grads() {
    std::vector<float> flat;
    for_each_grad_array(grads_, [&](const float* p, int64_t n) { flat.insert(flat.end(), p, p + n); });
    rendezvous_sum(*dp_.rv, flat);
    size_t at = 0;
    for_each_grad_array(grads_, [&](float* p, int64_t n) {
      std::copy_n(flat.data() + at, n, p);
      at += size_t(n);
    });
    std::vector<double> loss{loss_sum_};
    rendezvous_sum(*dp_.rv, loss);
    loss_sum_ = loss[0];
  }

  LoraAdapter& lora_;
  AdamW& opt_;
  LoraAdapter grads_;
  QwenDecoder<float> dec_;
  DataParallel dp_;
  double loss_sum_ = 0;
  int64_t experts_ = 0;
  std::vector<int64_t> load_;  // (MoE layers * E) since the last take_expert_load
};

}  // namespace

std::string resolve_device(const std::string& device, const std::string& context, std::string* why) {
  if (device != "auto" && device != "cpu" && device != "cuda")
    fail(context, "device '{}': use auto, cpu or cuda", device);
  if (device == "cpu") return device;
#ifdef QT_HAVE_CUDA
  const bool gpu = cuda::device_count() > 0;
  if (device == "cuda") {
    if (!gpu) fail(context, "device cuda: no CUDA device is visible (use --device cpu)");
    return device;
  }
  if (gpu) return "cuda";
  if (why) *why = "no CUDA device is visible";
  return "cpu";
#else
  (void)why;
  if (device == "cuda") fail(context, "device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
  return "cpu";
#endif
}

std::unique_ptr<TrainEngine> make_cpu_engine(const ModelWeights& w, LoraAdapter& lora, AdamW& opt,
                                             const DataParallel& dp) {
  return std::make_unique<CpuEngine>(w, lora, opt, dp);
}

bool resolve_embeddings_on_host(std::optional<bool> requested, const ModelConfig& cfg, bool four_bit) {
  return requested.value_or(four_bit) && !cfg.tie_word_embeddings;
}

}  // namespace qt
