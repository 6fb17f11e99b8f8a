// `qwentune train --gpus N`: start N local ranks of the same command, as torchrun would.
//
// launch_local_ranks() runs `exe` N times (fork + execve) with the environment of this process plus
// RANK=r, WORLD_SIZE=N, LOCAL_RANK=r, LOCAL_WORLD_SIZE=N, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a
// free port, found by binding port 0); CUDA_VISIBLE_DEVICES is left as it is, so rank r uses the
// r-th visible GPU. Output: rank 0 writes to this terminal (progress, errors); rank r >= 1 writes
// stdout and stderr to log_dir/rank-r.log (truncated at start), and when it fails the launcher prints
// the last lines of that log. The children form one process group of their own: SIGINT and SIGTERM
// sent to the launcher (Ctrl-C) are forwarded to every rank once per signal received (so the
// trainer's "first signal: checkpoint and stop, second: exit now" holds). When a rank exits with a
// non-zero code (or dies by a signal: 128 + signal) and the launcher was not told to stop, it
// sends SIGTERM to the other ranks, SIGKILL after kill_grace_s (a rank blocked in a collective
// never sees SIGTERM's flag), and returns that first code. Otherwise it returns the first non-zero
// code of any rank (130 after Ctrl-C), or 0. A launcher that dies (even by SIGKILL) takes its ranks
// along: each gets SIGTERM (PR_SET_PDEATHSIG).
#pragma once
#include <string>
#include <vector>

namespace qt::cli {

struct LaunchOptions {
  int nprocs = 1;
  std::string exe;                 // the program to run (train: this binary, /proc/self/exe)
  std::string argv0;               // argv[0] of the children (default: exe)
  std::vector<std::string> args;   // argv[1..] of every child
  std::string log_dir;             // where rank-R.log of ranks >= 1 go (created if missing)
  std::string master_addr = "127.0.0.1";
  int master_port = 0;             // 0: a free port of master_addr
  double kill_grace_s = 10;
};

// Runs the ranks and waits for all of them; returns the exit code described above.
int launch_local_ranks(const LaunchOptions& opts);

// This process's own command line (/proc/self/cmdline), argv[0] first.
std::vector<std::string> own_command_line();

// `args` without "--gpus N" / "--gpus=N" (the launcher's option must not reach the ranks).
std::vector<std::string> without_gpus_option(const std::vector<std::string>& args);

// `train --gpus N` (N >= 2): checks that device is not cpu and that no launcher already set RANK /
// WORLD_SIZE, then runs this binary's own command line without --gpus as N ranks (logs of ranks
// >= 1 in output_dir). Returns the exit code for the launcher process.
int launch_train_ranks(int gpus, const std::string& device, const std::string& output_dir);

// This process's own command line without --gpus (plus extra_args) as `nprocs` local ranks
// (launch_local_ranks; logs of ranks >= 1 in log_dir). Used by `train --gpus` and `bench --gpus`.
int launch_self_as_ranks(int nprocs, const std::string& log_dir, const std::vector<std::string>& extra_args = {});

}  // namespace qt::cli
