// qwentune debug grads: loss, logits and the gradient of every LoRA tensor for one batch.
// Output (safetensors, F32): "loss" [1], "logits" (B,S,V), "<PEFT name>.grad" per LoRA tensor.
#include <chrono>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "io/batch_json.h"
#include "io/safetensors.h"
#include "model/decoder.h"

namespace qt::cli {

namespace {

struct GradsArgs {
  std::string model, adapter, batch, out;
  std::string dtype = "f32";
};

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

  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back("loss", Tensor::from_vector<float>({float(r.loss())}, {1}));
  out.emplace_back("logits", r.logits.to(DType::F32));
  for (auto& [name, t] : lora_named_tensors(grads, w.cfg)) out.emplace_back(name + ".grad", t.to(DType::F32));
  write_safetensors(a.out, out);
  fmt::print("loss {:.6f} over {} tokens; {} gradient tensors; forward+backward {:.3f} s -> {}\n", r.loss(), r.count,
             out.size() - 2, secs, a.out);
}

}  // namespace

void register_debug_commands(CLI::App& app) {
  auto* debug = app.add_subcommand("debug", "Developer tools");
  debug->require_subcommand(1);
  auto args = std::make_shared<GradsArgs>();
  auto* grads = debug->add_subcommand("grads", "Loss, logits and LoRA gradients of one batch (CPU engine)");
  grads->add_option("--model", args->model, "Model directory (config.json + safetensors)")->required();
  grads->add_option("--adapter", args->adapter, "PEFT LoRA adapter directory")->required();
  grads->add_option("--batch", args->batch, "JSON {\"input_ids\": [[..]], \"labels\": [[..]]}")->required();
  grads->add_option("--out", args->out, "Output safetensors file")->required();
  grads->add_option("--dtype", args->dtype, "Compute precision: f32 (default) or f64")
      ->check(CLI::IsMember({"f32", "f64"}));
  grads->add_option("--device", [](const CLI::results_t& v) {
         if (v.at(0) != "cpu") qt::fail("device", "'{}' is not available in this build; use --device cpu", v.at(0));
         return true;
       }, "cpu (the CUDA backend is not built yet)")->default_str("cpu");
  grads->callback([args] {
    if (args->dtype == "f64")
      run_grads<double>(*args);
    else
      run_grads<float>(*args);
  });
}

}  // namespace qt::cli
