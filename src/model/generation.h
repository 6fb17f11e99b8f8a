// Text generation on top of a TokenDecoder (model/inference.h: KvDecoder<float> on the CPU,
// CudaKvDecoder on the GPU): the model's generation defaults, stop tokens and the prefill +
// token-by-token decoding loop.
//
// Defaults (HF GenerationConfig): do_sample false, temperature 1, top_k 50, top_p 1; then the
// keys of generation_config.json beside config.json when present (do_sample, temperature, top_k,
// top_p, eos_token_id as an int or a list); command-line flags override both.
// Stop tokens: every eos id of config.json and generation_config.json, the tokenizer's eos token,
// <|im_end|> and <|endoftext|> (when the vocabulary has them). A stop token ends generation and is
// not part of the output.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/inference.h"
#include "model/sampling.h"

namespace qt {

class Tokenizer;

struct GenerationDefaults {
  SamplingOptions sampling;
  std::vector<int32_t> eos_ids;  // from config.json and generation_config.json
  bool from_generation_config = false;
};

// config_path: the model's config.json. Throws "[generate] <file>: ..." on malformed files.
GenerationDefaults read_generation_defaults(const std::string& config_path);

// eos_ids + the tokenizer's eos, <|im_end|>, <|endoftext|>; sorted, unique.
std::vector<int32_t> stop_token_ids(const std::vector<int32_t>& eos_ids, const Tokenizer& tok);

struct GenerationStats {
  int64_t prompt_tokens = 0;  // tokens run in the prefill (not already cached)
  int64_t new_tokens = 0;     // generated, the stop token excluded
  bool stopped = false;       // ended on a stop token (else max_new_tokens)
  double prefill_s = 0, decode_s = 0;
};

// Runs `prompt` (>= 1 token) after what dec holds, then picks up to max_new_tokens tokens with
// `sampler`, calling on_token for each (not for the stop token). The generated tokens are in the
// cache afterwards, except the last one when max_new_tokens was reached.
GenerationStats generate(TokenDecoder& dec, const std::vector<int32_t>& prompt, Sampler& sampler,
                         int64_t max_new_tokens, const std::vector<int32_t>& stop_ids,
                         const std::function<void(int32_t)>& on_token);

// For a conversation re-rendered in full each turn: keeps the longest cached prefix of `full`
// (truncating the cache after it, at least one token short of `full`) and returns the tokens still
// to run.
std::vector<int32_t> uncached_suffix(TokenDecoder& dec, const std::vector<int32_t>& full);

}  // namespace qt
