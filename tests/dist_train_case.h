// The data-parallel training case shared by tests/test_dist_train.cpp (CPU ranks) and
// tests/test_cuda_dist_train.cpp (GPU ranks): 12 chat rows of which 2 go to validation, micro-batches
// of 2 = 5 per epoch, 6 steps (2 epochs; with G = 2 micro-batches per step, each epoch ends in a
// ragged step of one micro-batch), LoRA dropout on, one log line per step.
#pragma once
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace qt::test {

// Writes DIR/data.jsonl and DIR/train-<device>-ga<N>.yaml; returns the config's path.
inline std::string write_dist_train_config(const std::filesystem::path& dir, int grad_accum,
                                           const std::string& device, const std::string& model = "tiny-qwen3.json") {
  std::ofstream d(dir / "data.jsonl");
  const char* rows[] = {
      R"({"messages": [{"role": "user", "content": "Say the colour of the sky."}, {"role": "assistant", "content": "The sky is blue."}]})",
      R"({"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Two plus two is four."}]})",
      R"({"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple is a fruit."}]})",
      R"({"messages": [{"role": "user", "content": "Which planet is red?"}, {"role": "assistant", "content": "Mars is the red planet."}]})"};
  for (int i = 0; i < 3; ++i)
    for (const char* r : rows) d << r << "\n";
  const std::filesystem::path cfg = dir / ("train-" + device + "-ga" + std::to_string(grad_accum) + ".yaml");
  std::ofstream f(cfg);
  f << "base_model: " << QT_SOURCE_DIR << "/configs/" << model << "\n"
    << "datasets:\n  - path: " << (dir / "data.jsonl").string() << "\n    type: chat\n"
    << "chat_template: chatml\nsequence_len: 64\nmicro_batch_size: 2\ngradient_accumulation_steps: " << grad_accum
    << "\nmax_steps: 6\nlearning_rate: 5.0e-3\nlr_scheduler: cosine\nwarmup_steps: 1\nlora_dropout: 0.1\n"
    << "val_set_size: 2\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: [q_proj, v_proj, down_proj]\n"
    << "seed: 11\nlogging_steps: 1\nsave_steps: 0\ndevice: " << device << "\n";
  return cfg.string();
}

// One metric of every {"type": type} line of a metrics.jsonl.
inline std::vector<double> read_metric(const std::filesystem::path& file, const char* type, const char* key) {
  std::vector<double> out;
  std::ifstream f(file);
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) {
      const nlohmann::json j = nlohmann::json::parse(line);
      if (j["type"] == type) out.push_back(j[key].get<double>());
    }
  return out;
}

}  // namespace qt::test
