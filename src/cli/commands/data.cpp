// `qwentune data preview`: one dataset record as the model will see it, rendered with the chat
// template and tokenized, with trained tokens told apart from masked ones (green on a terminal,
// [[...]] around trained spans otherwise), and the token counts.
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "data/dataset.h"
#include "tokenizer/tokenizer.h"

namespace qt::cli {
namespace {

struct PreviewArgs {
  std::string tokenizer, data, format = "auto", chat_template = "auto";
  int64_t index = 0;
  int64_t sequence_len = 0;  // 0: no truncation shown
  bool train_on_inputs = false, lenient = false, plain = false;
};

// Consecutive tokens with the same trained/masked state are decoded together.
std::string highlight(const Tokenizer& tok, const data::LabeledTokens& lt, size_t shown, bool color) {
  std::string out;
  size_t t = 0;
  while (t < shown) {
    const bool trained = lt.labels[t] != -100;
    size_t e = t;
    while (e < shown && (lt.labels[e] != -100) == trained) ++e;
    const std::string text = tok.decode(std::vector<int32_t>(lt.ids.begin() + ptrdiff_t(t), lt.ids.begin() + ptrdiff_t(e)));
    if (!trained) out += color ? "\x1b[2m" + text + "\x1b[0m" : text;
    else out += color ? "\x1b[1;32m" + text + "\x1b[0m" : "[[" + text + "]]";
    t = e;
  }
  return out;
}

void run_preview(const PreviewArgs& a) {
  const Tokenizer tok = Tokenizer::load(a.tokenizer);
  data::ReadOptions ro;
  ro.format = data::parse_dataset_format(a.format);
  ro.lenient = a.lenient;
  const data::DatasetReadResult read = data::read_dataset_file(a.data, ro);
  const int64_t n = int64_t(read.records.size());
  if (a.index < 0 || a.index >= n)
    qt::fail("data", "--index {} is out of range: {} has {} usable records", a.index, a.data, n);
  const data::DatasetRecord& rec = read.records[size_t(a.index)];

  data::TokenizeOptions to;
  to.train_on_inputs = a.train_on_inputs;
  std::string template_note = "-";
  if (!rec.is_text) {
    const std::string origin = (std::filesystem::path(a.tokenizer) / "tokenizer_config.json").string();
    to.chat_template = data::resolve_chat_template(a.chat_template, tok, origin);
    template_note = data::chat_template_name(to.chat_template) + (a.chat_template == "auto" ? " (from the tokenizer)" : "");
  }
  const data::LabeledTokens lt = data::tokenize_record(rec, tok, to, data::token_byte_lengths(tok));
  const size_t shown = a.sequence_len > 0 ? std::min(lt.ids.size(), size_t(a.sequence_len)) : lt.ids.size();
  const bool color = !a.plain && ::isatty(STDOUT_FILENO);

  std::printf("file: %s (%s format), record %lld of %lld, line %lld\n", a.data.c_str(),
              data::dataset_format_name(read.summary.format).c_str(), (long long)a.index, (long long)n,
              (long long)rec.line);
  if (read.summary.records_skipped > 0)
    std::printf("skipped %lld bad records (lenient); first: %s\n", (long long)read.summary.records_skipped,
                read.summary.first_problems.front().c_str());
  std::printf("template: %s   labels: %s\n", template_note.c_str(),
              rec.is_text ? "all tokens (+eos)" : a.train_on_inputs ? "all tokens (train_on_inputs)" : "assistant turns only");
  std::printf("legend: %s\n", color ? "\x1b[1;32mtrained\x1b[0m \x1b[2mmasked (-100)\x1b[0m" : "[[trained]] masked (-100)");
  std::printf("----------------------------------------\n%s\n----------------------------------------\n",
              highlight(tok, lt, shown, color).c_str());
  int64_t trained = 0;
  for (size_t t = 0; t < shown; ++t) trained += lt.labels[t] != -100;
  std::printf("tokens: %zu, trained: %lld, masked: %lld (%.1f%% trained)\n", shown, (long long)trained,
              (long long)(int64_t(shown) - trained), shown ? 100.0 * double(trained) / double(shown) : 0.0);
  if (shown < lt.ids.size())
    std::printf("truncated: the example has %zu tokens; only the first %zu (sequence_len) are kept\n", lt.ids.size(), shown);
  if (lt.segmented_fallback)
    std::printf("note: the tokenizer's normaliser changed this text, so it was tokenized span by span\n");
}

}  // namespace

void register_data_commands(CLI::App& app) {
  auto* data = app.add_subcommand("data", "Inspect training data");
  data->require_subcommand(1);
  auto args = std::make_shared<PreviewArgs>();
  auto* p = data->add_subcommand("preview", "Show one record rendered and tokenized, trained tokens highlighted");
  p->add_option("--tokenizer", args->tokenizer, "Tokenizer directory (tokenizer.json, tokenizer_config.json)")->required();
  p->add_option("--data", args->data, "Dataset file (JSONL or JSON array)")->required();
  p->add_option("--format", args->format, "auto, text, messages, alpaca or sharegpt")->capture_default_str();
  p->add_option("--index", args->index, "Record to show (0-based, among usable records)")->capture_default_str();
  p->add_option("--chat-template", args->chat_template, "auto (from the tokenizer), chatml, qwen2, qwen2.5, qwen3")
      ->capture_default_str();
  p->add_option("--sequence-len", args->sequence_len, "Show truncation at this length (0: none)")->capture_default_str();
  p->add_flag("--train-on-inputs", args->train_on_inputs, "Train on every token, not only assistant turns");
  p->add_flag("--lenient", args->lenient, "Skip bad records instead of failing");
  p->add_flag("--plain", args->plain, "No colours: mark trained spans with [[...]]");
  p->callback([args] { run_preview(*args); });
}

}  // namespace qt::cli
