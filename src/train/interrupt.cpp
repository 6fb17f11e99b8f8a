// SIGINT/SIGTERM -> an atomic flag (see interrupt.h). The handler does only async-signal-safe
// things: an atomic exchange, write(2) and _exit(2).
#include "train/interrupt.h"

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>

namespace qt {

namespace {

std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");
struct sigaction g_old_int, g_old_term;

void say(const char* text) {
  const ssize_t ignored = ::write(STDERR_FILENO, text, std::strlen(text));
  (void)ignored;
}

void on_stop_signal(int sig) {
  if (g_signal.exchange(sig) != 0) {
    say("\nqwentune: second interrupt: exiting now without saving\n");
    ::_exit(128 + sig);
  }
  say("\nqwentune: stopping after this step and saving a checkpoint (interrupt again to quit at once)\n");
}

}  // namespace

StopSignalGuard::StopSignalGuard() {
  g_signal.store(0);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  ::sigaction(SIGINT, &sa, &g_old_int);
  ::sigaction(SIGTERM, &sa, &g_old_term);
}

StopSignalGuard::~StopSignalGuard() {
  ::sigaction(SIGINT, &g_old_int, nullptr);
  ::sigaction(SIGTERM, &g_old_term, nullptr);
}

int stop_signal() { return g_signal.load(); }

}  // namespace qt
