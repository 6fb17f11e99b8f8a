// Two tiers of errors.
//  1. User errors (bad files, bad configs, bad arguments): throw qt::Error whose message starts
//     with a context prefix, e.g. "[safetensors] model.safetensors: header length 9e18 exceeds file".
//     The CLI catches these and prints the message as one line, exit code 1.
//  2. Broken internal invariants: QT_ASSERT(cond, fmt, args...) prints file:line and aborts.
#pragma once
#include <fmt/format.h>
#include <stdexcept>
#include <string>
#include <string_view>

namespace qt {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Throws qt::Error("[context] message").
template <typename... Args>
[[noreturn]] void fail(std::string_view context, fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format("[{}] {}", context, fmt::format(f, std::forward<Args>(args)...)));
}

[[noreturn]] void abort_invariant(const char* file, int line, const char* cond, const std::string& msg);

}  // namespace qt

#define QT_ASSERT(cond, ...)                                                            \
  do {                                                                                  \
    if (!(cond)) ::qt::abort_invariant(__FILE__, __LINE__, #cond, ::fmt::format(__VA_ARGS__)); \
  } while (0)
