// qwentune tokenize: encode a JSON array of strings into a JSON array of token-id arrays.
//   qwentune tokenize --tokenizer DIR_OR_JSON --in strings.json --out ids.json
//     [--threads N]   0 = all cores (default); 1 = one encode call per string on this thread
//     [--no-special]  do not match added/special tokens in the text (plain BPE of everything)
//     [--stats]       print encode throughput (MB/s, tokens/s) to stderr; timing covers encoding only
//     [--repeat R]    with --stats: encode R times and report the fastest pass
// Special tokens are matched only where they are written in the text; nothing is added around it.
// The output is written atomically (temporary file, fsync, rename).
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli/commands/commands.h"
#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace qt::cli {
namespace {

struct TokenizeArgs {
  std::string tokenizer, in, out;
  int threads = 0;
  int repeat = 1;
  bool no_special = false, stats = false;
};

std::vector<std::string> read_string_array(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("tokenize", "{}: cannot open", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    fail("tokenize", "{}: not valid JSON: {}", path, e.what());
  }
  if (!j.is_array()) fail("tokenize", "{}: expected a JSON array of strings", path);
  std::vector<std::string> texts;
  texts.reserve(j.size());
  for (size_t i = 0; i < j.size(); ++i) {
    if (!j[i].is_string()) fail("tokenize", "{}: element {} is not a string", path, i);
    texts.push_back(std::move(j[i].get_ref<std::string&>()));
  }
  return texts;
}

void write_atomically(const std::string& path, const fmt::memory_buffer& buf) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) fail("tokenize", "{}: cannot create", tmp);
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t w = ::write(fd, buf.data() + done, buf.size() - done);
    if (w <= 0) {
      ::close(fd);
      ::unlink(tmp.c_str());
      fail("tokenize", "{}: write failed", tmp);
    }
    done += size_t(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    fail("tokenize", "{}: write failed", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    fail("tokenize", "{}: cannot rename to {}", tmp, path);
  }
}

std::vector<std::vector<int32_t>> encode_all(const Tokenizer& tok, const std::vector<std::string>& texts,
                                             const TokenizeArgs& a) {
  if (a.threads != 1) return tok.encode_batch(texts, a.threads, !a.no_special);
  std::vector<std::vector<int32_t>> ids;
  ids.reserve(texts.size());
  for (const auto& t : texts) ids.push_back(a.no_special ? tok.encode_ordinary(t) : tok.encode(t));
  return ids;
}

void run_tokenize(const TokenizeArgs& a) {
  if (a.threads < 0) fail("tokenize", "--threads must be >= 0");
  if (a.repeat < 1) fail("tokenize", "--repeat must be >= 1");
  std::vector<std::string> texts = read_string_array(a.in);  // bad input fails before the slow load
  Tokenizer tok = Tokenizer::load(a.tokenizer);

  std::vector<std::vector<int32_t>> ids;
  double best_s = 1e300;
  for (int r = 0; r < a.repeat; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    ids = encode_all(tok, texts, a);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best_s = std::min(best_s, s);
  }

  fmt::memory_buffer buf;
  buf.push_back('[');
  size_t n_tokens = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) buf.push_back(',');
    buf.push_back('[');
    for (size_t k = 0; k < ids[i].size(); ++k) {
      if (k) buf.push_back(',');
      fmt::format_to(std::back_inserter(buf), "{}", ids[i][k]);
    }
    buf.push_back(']');
    n_tokens += ids[i].size();
  }
  buf.append(std::string_view("]\n"));
  write_atomically(a.out, buf);

  if (a.stats) {
    size_t n_bytes = 0;
    for (const auto& t : texts) n_bytes += t.size();
    std::fprintf(stderr,
                 "tokenize: %zu strings, %.3f MB, %zu tokens; encode %.3f s (best of %d, threads %d): "
                 "%.2f MB/s, %.3f M tokens/s\n",
                 texts.size(), double(n_bytes) / 1e6, n_tokens, best_s, a.repeat, a.threads,
                 double(n_bytes) / 1e6 / best_s, double(n_tokens) / 1e6 / best_s);
  }
}

}  // namespace

void register_tokenize_command(CLI::App& app) {
  auto args = std::make_shared<TokenizeArgs>();
  auto* t = app.add_subcommand("tokenize", "Encode a JSON array of strings to token ids");
  t->add_option("--tokenizer", args->tokenizer, "tokenizer.json, or a directory holding it")->required();
  t->add_option("--in", args->in, "input: JSON array of strings")->required();
  t->add_option("--out", args->out, "output: JSON array of token-id arrays")->required();
  t->add_option("--threads", args->threads, "encoding threads (0 = all cores, 1 = serial)");
  t->add_flag("--no-special", args->no_special, "do not match special/added tokens in the text");
  t->add_flag("--stats", args->stats, "print encode throughput to stderr");
  t->add_option("--repeat", args->repeat, "with --stats: encode this many times, report the fastest");
  t->callback([args] { run_tokenize(*args); });
}

}  // namespace qt::cli
