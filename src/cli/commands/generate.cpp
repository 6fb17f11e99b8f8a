// `qwentune generate`: text from a model (+ LoRA adapter, unmerged) with a KV cache, streamed to
// stdout as tokens arrive (whole UTF-8 characters only).
//   --prompt TEXT : one user turn rendered with the chat template + the generation prompt
//                   (--raw: the text is the prompt as is), then one answer.
//   --chat        : reads user lines from stdin until EOF or /exit; the whole conversation is
//                   re-rendered each turn and only the tokens not yet in the KV cache are run.
// Sampling: generation_config.json defaults (see model/generation.h); --greedy or --temperature 0
// decode greedily; --temperature/--top-k/--top-p (> 0, < 1) turn sampling on with those values.
// The speed (prompt and generated tokens per second) goes to stderr at the end of each answer.
// --device auto (cuda when this build has CUDA and a GPU is visible), cpu (KvDecoder<float>) or cuda
// (CudaKvDecoder: bf16 or NF4 weights, LoRA unmerged); the device goes to stderr before the answer.
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>

#include "cli/commands/commands.h"
#include "cli/commands/model_loading.h"
#include "core/error.h"
#include "data/dataset.h"
#include "model/generation.h"
#include "tokenizer/token_streamer.h"
#include "train/train_engine.h"
#ifdef QT_HAVE_CUDA
#include "model/cuda_kv_decoder.h"
#endif

namespace qt::cli {

namespace {

struct GenerateArgs {
  ModelOptions m;
  std::string prompt, system, chat_template = "auto";
  bool chat = false, raw = false, greedy = false, no_thinking = false;
  int64_t max_new_tokens = 256;
  std::optional<double> temperature, top_p;
  std::optional<int64_t> top_k;
  uint64_t seed = 0;
  std::string device = "auto";
};

SamplingOptions resolve_sampling(const GenerateArgs& a, const GenerationDefaults& d) {
  SamplingOptions s = d.sampling;
  if (a.temperature) {
    if (*a.temperature == 0) {
      s.do_sample = false;
    } else {
      s.temperature = *a.temperature;
      s.do_sample = true;
    }
  }
  if (a.top_k) {
    s.top_k = *a.top_k;
    s.do_sample = s.do_sample || !a.temperature || *a.temperature != 0;
  }
  if (a.top_p) {
    s.top_p = *a.top_p;
    s.do_sample = s.do_sample || !a.temperature || *a.temperature != 0;
  }
  if (a.greedy) s.do_sample = false;
  s.validate();
  return s;
}

void print_speed(const GenerationStats& st) {
  const double pre = st.prefill_s > 0 ? double(st.prompt_tokens) / st.prefill_s : 0.0;
  const double dec = st.decode_s > 0 ? double(st.new_tokens) / st.decode_s : 0.0;
  std::fprintf(stderr, "[%lld prompt tokens at %.1f tok/s, %lld generated at %.1f tok/s%s]\n",
               (long long)st.prompt_tokens, pre, (long long)st.new_tokens, dec,
               st.stopped ? "" : ", stopped at --max-new-tokens");
}

// Runs the prompt tokens and streams the answer to stdout; returns the answer's text.
std::string answer(TokenDecoder& dec, const std::vector<int32_t>& prompt, Sampler& sampler, const GenerateArgs& a,
                   const std::vector<int32_t>& stops, const Tokenizer& tok) {
  TokenStreamer streamer(tok);
  std::string text;
  auto emit = [&](const std::string& s) {
    if (s.empty()) return;
    text += s;
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
  };
  const GenerationStats st =
      generate(dec, prompt, sampler, a.max_new_tokens, stops, [&](int32_t id) { emit(streamer.push(id)); });
  emit(streamer.finish());
  std::fputc('\n', stdout);
  std::fflush(stdout);
  print_speed(st);
  return text;
}

void run_generate(const GenerateArgs& a) {
  if (a.chat == !a.prompt.empty()) fail("generate", "give exactly one of --prompt TEXT and --chat");
  if (a.max_new_tokens < 1) fail("generate", "--max-new-tokens {} must be >= 1", a.max_new_tokens);
  if (a.raw && a.chat) fail("generate", "--raw works with --prompt only (--chat always uses the chat template)");
  // Flag values first, so that a typo fails before the model loads.
  if (a.temperature && !(*a.temperature >= 0)) fail("generate", "--temperature {} must be >= 0", *a.temperature);
  if (a.top_k && *a.top_k < 0) fail("generate", "--top-k {} must be >= 0 (0 turns it off)", *a.top_k);
  if (a.top_p && !(*a.top_p > 0 && *a.top_p <= 1)) fail("generate", "--top-p {} must be in (0, 1]", *a.top_p);
  // The device before the model: the GPU gets bf16 host tensors (QLoRA: only the NF4 base).
  std::string device_note;
  const std::string device = resolve_device(a.device, "generate", &device_note);
  CliModel m = load_cli_model(a.m, "generate", weights_for(device));
  const GenerationDefaults defaults = read_generation_defaults(m.model.config_path);
  const SamplingOptions sampling = resolve_sampling(a, defaults);
  const std::vector<int32_t> stops = stop_token_ids(defaults.eos_ids, m.tok);
  Sampler sampler(sampling, a.seed);
  std::unique_ptr<TokenDecoder> decoder;
  std::string described = device;
#ifdef QT_HAVE_CUDA
  if (device == "cuda") {
    auto gpu = std::make_unique<CudaKvDecoder>(m.model.weights, m.adapter.get());
    described = gpu->describe();
    decoder = std::move(gpu);
  }
#endif
  if (!decoder) decoder = std::make_unique<KvDecoder<float>>(m.model.weights, m.adapter.get());
  std::fprintf(stderr, "device: %s%s\n", described.c_str(), device_note.empty() ? "" : (" (" + device_note + ")").c_str());
  TokenDecoder& dec = *decoder;

  data::Conversation conv;
  if (!a.system.empty()) conv.messages.push_back({"system", a.system, std::nullopt, {}});
  data::RenderOptions ro;
  ro.add_generation_prompt = true;
  if (a.no_thinking) ro.enable_thinking = false;
  std::optional<data::ChatTemplateKind> kind;
  if (!a.raw) {
    const std::string origin = (std::filesystem::path(m.model.tokenizer_path) / "tokenizer_config.json").string();
    kind = data::resolve_chat_template(a.chat_template, m.tok, origin);
  }

  if (!a.chat) {
    std::vector<int32_t> prompt;
    if (a.raw) {
      prompt = m.tok.encode(a.prompt);
    } else {
      conv.messages.push_back({"user", a.prompt, std::nullopt, {}});
      prompt = m.tok.encode(data::render_chat(*kind, conv, ro).text);
    }
    if (prompt.empty()) fail("generate", "the prompt encodes to no tokens");
    answer(dec, prompt, sampler, a, stops, m.tok);
    return;
  }

  std::fprintf(stderr, "qwentune chat: %s%s. Type a message and press Enter; /exit or end of input quits.\n",
               m.model.description.c_str(), a.m.adapter.empty() ? "" : (" + " + a.m.adapter).c_str());
  std::string line;
  while (true) {
    if (::isatty(fileno(stdin))) std::fputs("> ", stderr);
    if (!std::getline(std::cin, line)) break;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line == "/exit") break;
    if (line.empty()) continue;
    conv.messages.push_back({"user", line, std::nullopt, {}});
    const std::vector<int32_t> full = m.tok.encode(data::render_chat(*kind, conv, ro).text);
    const std::string reply = answer(dec, uncached_suffix(dec, full), sampler, a, stops, m.tok);
    conv.messages.push_back({"assistant", reply, std::nullopt, {}});
  }
}

}  // namespace

void register_generate_command(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* c = app.add_subcommand("generate", "Generate text with a model (+ LoRA adapter), streamed to stdout");
  add_model_options(c, a->m);
  c->add_option("--prompt", a->prompt, "Prompt: one user turn in the chat template (as is with --raw)");
  c->add_flag("--chat", a->chat, "Interactive chat: user lines from stdin until EOF or /exit, history kept");
  c->add_option("--system", a->system, "System message of the conversation");
  c->add_flag("--raw", a->raw, "Use the --prompt text as the prompt as is, without the chat template");
  c->add_option("--chat-template", a->chat_template,
                "auto (the tokenizer's, default), chatml, qwen2, qwen2.5 or qwen3");
  c->add_flag("--no-thinking", a->no_thinking, "Qwen3 template: add the empty <think></think> block (no reasoning)");
  c->add_option("--max-new-tokens", a->max_new_tokens, "Most tokens to generate per answer (default 256)");
  c->add_flag("--greedy", a->greedy, "Greedy decoding (argmax), whatever generation_config.json says");
  c->add_option("--temperature", a->temperature,
                "Sampling temperature (> 0 turns sampling on; 0 = greedy); default from generation_config.json, else 1");
  c->add_option("--top-k", a->top_k, "Keep the k most likely tokens when sampling (0 = off); default "
                                     "generation_config.json, else 50");
  c->add_option("--top-p", a->top_p, "Nucleus sampling: keep the most likely tokens up to probability p, in (0, 1]; "
                                     "default generation_config.json, else 1");
  c->add_option("--seed", a->seed, "Sampling seed (default 0): the same seed gives the same text");
  c->add_option("--device", a->device, "auto (default: cuda when this build has CUDA and a GPU is visible), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  c->footer("\nStops at any eos id of config.json / generation_config.json, <|im_end|>, <|endoftext|>, or "
            "--max-new-tokens. Speed goes to stderr.");
  c->callback([a] { run_generate(*a); });
}

}  // namespace qt::cli
