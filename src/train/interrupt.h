// Ctrl-C and SIGTERM during training. While a StopSignalGuard lives, SIGINT and SIGTERM only set an
// atomic flag (and print one line); the trainer polls stop_signal() after each optimizer step,
// saves a checkpoint and exits with 128 + the signal (130 for Ctrl-C). A second signal exits at once
// with that code (_exit): the atomic checkpoint writer never leaves a half-valid checkpoint behind.
#pragma once

namespace qt {

class StopSignalGuard {
 public:
  StopSignalGuard();   // installs the handlers, clears the flag
  ~StopSignalGuard();  // restores the previous handlers
  StopSignalGuard(const StopSignalGuard&) = delete;
  StopSignalGuard& operator=(const StopSignalGuard&) = delete;
};

// The first signal received while a guard lived (SIGINT or SIGTERM), 0 when none.
int stop_signal();

}  // namespace qt
