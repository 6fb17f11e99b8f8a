// qwentune debug grads: loss, logits and the gradient of every LoRA tensor for one batch.
// Output (safetensors, F32): "loss" [1], "logits" (B,S,V), "<PEFT name>.grad" per LoRA tensor.
#include <chrono>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/batch_json.h"
#include "io/safetensors.h"
#include "model/decoder.h"
#include "train/train_engine.h"
#ifdef QT_HAVE_CUDA
#include "model/cuda_decoder.h"
#endif

namespace qt::cli {

namespace {

struct GradsArgs {
  std::string model, adapter, batch, out;
  std::string dtype = "f32", device = "cpu";
};

void write_grads(const std::string& path, double loss, int64_t count, const Tensor& logits, const LoraAdapter& grads,
                 const ModelConfig& cfg, double secs) {
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back("loss", Tensor::from_vector<float>({float(loss)}, {1}));
  out.emplace_back("logits", logits.to(DType::F32));
  for (auto& [name, t] : lora_named_tensors(grads, cfg)) out.emplace_back(name + ".grad", t.to(DType::F32));
  write_safetensors(path, out);
  fmt::print("loss {:.6f} over {} tokens; {} gradient tensors; forward+backward {:.3f} s -> {}\n", loss, count,
             out.size() - 2, secs, path);
}

#ifdef QT_HAVE_CUDA
// The CUDA engine (bf16 weights and activations): gradients of the mean loss, logits from the
// final hidden states.
void run_grads_cuda(const GradsArgs& a) {
  ModelWeights w = load_model_weights(a.model, DType::F32);
  (void)resolve_device("cuda", "debug grads");  // a visible GPU
  LoraAdapter lora = load_peft_adapter(a.adapter, w.cfg, DType::F32);
  const Batch batch = load_batch_json(a.batch);
  cuda::Context ctx;
  CudaDecoder dec(ctx, w, lora);
  auto t0 = std::chrono::steady_clock::now();
  dec.set_batch(batch);
  dec.zero_grads();
  dec.forward_backward();
  const double loss = dec.loss_sum() / double(std::max<int64_t>(1, dec.count()));
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  write_grads(a.out, loss, dec.count(), dec.logits(), dec.download_grads(), w.cfg, secs);
}
#endif

template <typename T>
void run_grads(const GradsArgs& a) {
  const DType dt = dtype_of<T>();
  ModelWeights w = load_model_weights(a.model, dt);
  LoraAdapter lora = load_peft_adapter(a.adapter, w.cfg, dt);
  Batch batch = load_batch_json(a.batch);
  LoraAdapter grads = lora.zeros_like();
  QwenDecoder<T> dec(w, &lora);
  auto t0 = std::chrono::steady_clock::now();
  StepResult r = dec.forward_backward(batch, &grads, /*keep_logits=*/true);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  write_grads(a.out, r.loss(), r.count, r.logits, grads, w.cfg, secs);
}

}  // namespace

void register_debug_commands(CLI::App& app) {
  auto* debug = app.add_subcommand("debug", "Developer tools");
  debug->require_subcommand(1);
  auto args = std::make_shared<GradsArgs>();
  auto* grads = debug->add_subcommand("grads", "Loss, logits and LoRA gradients of one batch");
  grads->add_option("--model", args->model, "Model directory (config.json + safetensors)")->required();
  grads->add_option("--adapter", args->adapter, "PEFT LoRA adapter directory")->required();
  grads->add_option("--batch", args->batch, "JSON {\"input_ids\": [[..]], \"labels\": [[..]]}")->required();
  grads->add_option("--out", args->out, "Output safetensors file")->required();
  grads->add_option("--dtype", args->dtype, "Compute precision: f32 (default) or f64")
      ->check(CLI::IsMember({"f32", "f64"}));
  grads->add_option("--device", args->device,
                    "cpu (default: the exact engine, --dtype applies) or cuda (bf16 engine; dense models)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  grads->callback([args] {
    if (args->device == "cuda") {
#ifdef QT_HAVE_CUDA
      if (args->dtype != "f32") qt::fail("debug grads", "--dtype {} applies to the CPU engine only", args->dtype);
      run_grads_cuda(*args);
#else
      qt::fail("debug grads", "--device cuda: this build has no CUDA backend (configure with -DQT_CUDA=ON)");
#endif
    } else if (args->dtype == "f64")
      run_grads<double>(*args);
    else
      run_grads<float>(*args);
  });
}

}  // namespace qt::cli
