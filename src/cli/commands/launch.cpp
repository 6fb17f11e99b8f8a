// Local multi-process launcher for `train --gpus N` (see launch.h).
#include "cli/commands/launch.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "core/error.h"
#include "dist/dist_env.h"
#include "dist/tcp.h"

extern char** environ;

namespace qt::cli {
namespace {

volatile sig_atomic_t g_signals_received = 0;
volatile sig_atomic_t g_last_signal = 0;

void on_signal(int sig) {
  g_last_signal = sig;
  g_signals_received = g_signals_received + 1;
}

// Installs the forwarding handlers for SIGINT / SIGTERM and restores the old ones on exit.
class ForwardSignals {
 public:
  ForwardSignals() {
    g_signals_received = 0;
    g_last_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int_);
    sigaction(SIGTERM, &sa, &old_term_);
  }
  ~ForwardSignals() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  ForwardSignals(const ForwardSignals&) = delete;
  ForwardSignals& operator=(const ForwardSignals&) = delete;

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

bool is_dist_variable(const char* kv) {
  for (const char* name : {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT="})
    if (std::strncmp(kv, name, std::strlen(name)) == 0) return true;
  return false;
}

std::vector<std::string> child_environment(int rank, int world, const std::string& addr, int port) {
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e)
    if (!is_dist_variable(*e)) env.emplace_back(*e);
  env.push_back(fmt::format("RANK={}", rank));
  env.push_back(fmt::format("WORLD_SIZE={}", world));
  env.push_back(fmt::format("LOCAL_RANK={}", rank));
  env.push_back(fmt::format("LOCAL_WORLD_SIZE={}", world));
  env.push_back("MASTER_ADDR=" + addr);
  env.push_back(fmt::format("MASTER_PORT={}", port));
  return env;
}

std::vector<char*> c_strings(std::vector<std::string>& v) {
  std::vector<char*> out;
  for (auto& s : v) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

int exit_code(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

std::string log_tail(const std::string& path, size_t lines) {
  std::ifstream f(path);
  std::vector<std::string> all;
  for (std::string line; std::getline(f, line);) all.push_back(line);
  std::string out;
  for (size_t i = all.size() > lines ? all.size() - lines : 0; i < all.size(); ++i) out += "  | " + all[i] + "\n";
  return out;
}

struct Child {
  pid_t pid = -1;
  bool running = false;
  std::string log;  // empty for rank 0
};

}  // namespace

std::vector<std::string> own_command_line() {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> args;
  for (std::string a; std::getline(f, a, '\0');) args.push_back(a);
  if (args.empty()) fail("launch", "cannot read this process's command line from /proc/self/cmdline");
  return args;
}

std::vector<std::string> without_gpus_option(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--gpus") {
      ++i;  // and its value
    } else if (args[i].rfind("--gpus=", 0) != 0) {
      out.push_back(args[i]);
    }
  }
  return out;
}

int launch_local_ranks(const LaunchOptions& opts) {
  if (opts.nprocs < 1) fail("launch", "--gpus {}: must be at least 1", opts.nprocs);
  QT_ASSERT(!opts.exe.empty(), "launch without a program");
  std::error_code ec;
  if (opts.nprocs > 1) {
    std::filesystem::create_directories(opts.log_dir, ec);
    if (ec) fail("launch", "cannot create {} for the ranks' logs: {}", opts.log_dir, ec.message());
  }
  const int port = opts.master_port ? opts.master_port : dist::pick_free_port(opts.master_addr);
  if (opts.nprocs > 1)
    fmt::print("launch: {} ranks, rendezvous on {}:{}; rank 0 prints here, ranks 1..{} write {}/rank-R.log\n",
               opts.nprocs, opts.master_addr, port, opts.nprocs - 1, opts.log_dir);
  std::vector<std::string> argv{opts.argv0.empty() ? opts.exe : opts.argv0};
  argv.insert(argv.end(), opts.args.begin(), opts.args.end());
  std::vector<char*> argv_c = c_strings(argv);

  const ForwardSignals forward;
  std::vector<Child> children(size_t(opts.nprocs));
  pid_t group = 0;
  const pid_t launcher = ::getpid();
  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < opts.nprocs; ++r) {
    Child& c = children[size_t(r)];
    int log_fd = -1;
    if (r > 0) {
      c.log = (std::filesystem::path(opts.log_dir) / fmt::format("rank-{}.log", r)).string();
      log_fd = ::open(c.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (log_fd < 0) {
        if (group) ::kill(-group, SIGKILL);
        fail("launch", "cannot write {}: {}", c.log, std::strerror(errno));
      }
    }
    std::vector<std::string> env = child_environment(r, opts.nprocs, opts.master_addr, port);
    std::vector<char*> env_c = c_strings(env);
    const pid_t pid = ::fork();
    if (pid == 0) {  // the child: only async-signal-safe calls until execve
      ::setpgid(0, group);
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a launcher killed with SIGKILL takes its ranks along
      if (::getppid() != launcher) ::_exit(128 + SIGTERM);
      if (log_fd >= 0) {
        ::dup2(log_fd, STDOUT_FILENO);
        ::dup2(log_fd, STDERR_FILENO);
      }
      ::execve(opts.exe.c_str(), argv_c.data(), env_c.data());
      const char msg[] = "qwentune: error: [launch] cannot execute the rank's program\n";
      (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
      ::_exit(127);
    }
    if (log_fd >= 0) ::close(log_fd);
    if (pid < 0) {
      if (group) ::kill(-group, SIGKILL);
      fail("launch", "cannot start rank {}: fork: {}", r, std::strerror(errno));
    }
    ::setpgid(pid, group);  // also here: whichever of parent and child runs first
    if (r == 0) group = pid;
    c.pid = pid;
    c.running = true;
  }

  using Clock = std::chrono::steady_clock;
  int live = opts.nprocs, first_code = 0, forwarded = 0;
  bool terminating = false;
  Clock::time_point kill_at{};
  while (live > 0) {
    for (; forwarded < g_signals_received; ++forwarded) ::kill(-group, g_last_signal);
    for (int r = 0; r < opts.nprocs; ++r) {
      Child& c = children[size_t(r)];
      int status = 0;
      if (!c.running || ::waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
      c.running = false;
      --live;
      const int code = exit_code(status);
      if (code == 0 || first_code != 0) continue;
      first_code = code;
      if (forwarded > 0) continue;  // stopping on the user's signal: every rank stops on its own
      std::fprintf(stderr, "qwentune: error: [launch] rank %d of %d exited with code %d; stopping the other ranks\n",
                   r, opts.nprocs, code);
      const std::string tail = c.log.empty() ? "" : log_tail(c.log, 20);
      if (!tail.empty()) std::fprintf(stderr, "last lines of %s:\n%s", c.log.c_str(), tail.c_str());
      ::kill(-group, SIGTERM);
      terminating = true;
      kill_at = Clock::now() + std::chrono::milliseconds(int64_t(opts.kill_grace_s * 1000));
    }
    if (terminating && live > 0 && Clock::now() >= kill_at) {
      ::kill(-group, SIGKILL);
      terminating = false;
    }
    if (live > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::fflush(stderr);
  return first_code;
}

int launch_train_ranks(int gpus, const std::string& device, const std::string& output_dir) {
  if (gpus < 1) fail("train", "--gpus {}: must be at least 1", gpus);
  const dist::DistEnv env = dist::read_dist_env();
  if (env.distributed())
    fail("train", "--gpus {} starts its own ranks; this process is already {} (drop --gpus under torchrun, srun or mpirun)",
         gpus, env.describe());
  if (device == "cpu")
    fail("train", "--gpus {}: runs one rank per GPU, but this run has device: cpu (start CPU ranks with torchrun or "
                  "RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; see docs/distributed.md)", gpus);
  return launch_self_as_ranks(gpus, output_dir);
}

int launch_self_as_ranks(int nprocs, const std::string& log_dir, const std::vector<std::string>& extra_args) {
  const std::vector<std::string> cmd = own_command_line();
  LaunchOptions o;
  o.nprocs = nprocs;
  std::error_code ec;
  o.exe = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec) fail("launch", "cannot find this program's path (/proc/self/exe): {}", ec.message());
  o.argv0 = cmd[0];
  o.args = without_gpus_option(std::vector<std::string>(cmd.begin() + 1, cmd.end()));
  o.args.insert(o.args.end(), extra_args.begin(), extra_args.end());
  o.log_dir = log_dir;
  return launch_local_ranks(o);
}

}  // namespace qt::cli
