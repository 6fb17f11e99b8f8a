#include "core/error.h"

#include <cstdio>
#include <cstdlib>

namespace qt {

void abort_invariant(const char* file, int line, const char* cond, const std::string& msg) {
  std::fprintf(stderr, "qwentune: internal error at %s:%d: %s (%s)\n", file, line, msg.c_str(), cond);
  std::fflush(stderr);
  std::abort();
}

}  // namespace qt
