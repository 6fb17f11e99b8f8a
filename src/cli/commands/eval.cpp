// `qwentune eval`: loss and perplexity of a model (+ LoRA adapter) on a dataset, labelled exactly as
// training labels it (assistant turns only for chat data unless --train-on-inputs; every token +
// eos for text). loss = token mean of the cross-entropy over the labelled tokens, perplexity =
// exp(loss) (train/evaluate.h). With --json one JSON line:
//   {"loss", "perplexity", "tokens", "sequences", "truncated", "model", "adapter", "data"}.
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/commands/commands.h"
#include "cli/commands/model_loading.h"
#include "core/error.h"
#include "data/dataset.h"
#include "train/evaluate.h"
#include "train/train_engine.h"

namespace qt::cli {

namespace {

struct EvalArgs {
  ModelOptions m;
  std::string data, type = "auto", chat_template = "auto";
  int64_t sequence_len = 2048, batch = 1;
  bool json = false, train_on_inputs = false, lenient = false;
  std::string device = "auto";
};

void run_eval(const EvalArgs& a) {
  if (a.sequence_len < 2) fail("eval", "--sequence-len {} must be >= 2", a.sequence_len);
  if (a.batch < 1) fail("eval", "--batch {} must be >= 1", a.batch);
  std::error_code ec;
  if (!std::filesystem::is_regular_file(a.data, ec)) fail("eval", "--data {}: no such file", a.data);
  const std::string device = resolve_device(a.device, "eval");
  CliModel m = load_cli_model(a.m, "eval", weights_for(device));

  data::DatasetOptions opts;
  opts.path = a.data;
  opts.read.format = data::parse_dataset_format(a.type == "chat" ? "messages" : a.type);
  opts.read.lenient = a.lenient;
  opts.tokenize.chat_template = data::resolve_chat_template(
      a.chat_template, m.tok, (std::filesystem::path(m.model.tokenizer_path) / "tokenizer_config.json").string());
  opts.tokenize.train_on_inputs = a.train_on_inputs;
  opts.tokenize.sequence_len = a.sequence_len;
  opts.tokenize.packing = false;
  const data::LoadedDataset ld = data::load_dataset(opts, m.tok, data::tokenizer_fingerprint(m.model.tokenizer_path));
  if (ld.data.size() == 0) fail("eval", "{}: no example left to evaluate", a.data);

  const int32_t pad_id = m.tok.pad_id() >= 0 ? m.tok.pad_id() : std::max(0, m.tok.eos_id());
  EvalResult r;
  if (device == "cuda") {
    LoraAdapter none;  // no adapter: every slot absent
    none.layers.resize(size_t(m.model.cfg.num_hidden_layers));
    const LoraAdapter& lora = m.adapter ? *m.adapter : none;
    const AdamW unused(lora, AdamWConfig{});
    r = make_cuda_engine(m.model.weights, lora, unused)->evaluate(ld.data, a.batch, pad_id);
  } else {
    QwenDecoder<float> dec(m.model.weights, m.adapter.get());
    r = evaluate_dataset(dec, ld.data, a.batch, pad_id);
  }
  if (r.count == 0) fail("eval", "{}: no labelled token to evaluate", a.data);
  if (a.json) {
    const nlohmann::json j = {{"loss", r.ce_loss()},          {"perplexity", r.perplexity()},
                              {"tokens", r.count},            {"sequences", r.sequences},
                              {"truncated", ld.data.stats.truncated},
                              {"model", a.m.model},             {"adapter", a.m.adapter},
                              {"data", a.data}};
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("model: %s%s\ndata: %s (%lld sequences, %lld truncated to %lld tokens)\n",
                m.model.description.c_str(), a.m.adapter.empty() ? "" : (" + adapter " + a.m.adapter).c_str(),
                a.data.c_str(), (long long)r.sequences, (long long)ld.data.stats.truncated, (long long)a.sequence_len);
    std::printf("loss %.6f  perplexity %.4f  over %lld labelled tokens\n", r.ce_loss(), r.perplexity(),
                (long long)r.count);
  }
}

}  // namespace

void register_eval_command(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* c = app.add_subcommand("eval", "Loss and perplexity of a model (+ LoRA adapter) on a dataset");
  add_model_options(c, a->m);
  c->add_option("--data", a->data, "Dataset file (JSONL or JSON array)")->required();
  c->add_option("--type", a->type, "Record format: auto (default), chat, text, alpaca or sharegpt")
      ->check(CLI::IsMember({"auto", "chat", "messages", "text", "alpaca", "sharegpt"}));
  c->add_option("--chat-template", a->chat_template, "auto (the tokenizer's, default), chatml, qwen2, qwen2.5, qwen3");
  c->add_option("--sequence-len", a->sequence_len, "Longest sequence; longer examples are truncated (default 2048)");
  c->add_option("--batch", a->batch, "Sequences per forward pass (default 1; the loss does not depend on it)");
  c->add_flag("--train-on-inputs", a->train_on_inputs, "Chat data: score every token, not only assistant turns");
  c->add_flag("--lenient", a->lenient, "Skip bad records (counted) instead of failing on the first");
  c->add_option("--device", a->device, "auto (default: cuda when available for this model), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  c->add_flag("--json", a->json, "Print one JSON line: loss, perplexity, tokens, sequences, truncated, model, ...");
  c->callback([a] { run_eval(*a); });
}

}  // namespace qt::cli
