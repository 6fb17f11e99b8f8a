// The rendezvous on loopback (ranks as threads of this process) and the local launcher (ranks as
// shell scripts): joining, broadcast / all-gather / barrier, clear failures for a rank that never
// arrives, a mismatching fingerprint, a port in use, a stray client, a rank that dies; the
// launcher's environment, logs, failure propagation and signal forwarding.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <thread>
#include <tuple>

#include "cli/commands/launch.h"
#include "core/error.h"
#include "dist/rendezvous.h"
#include "test_files.h"

namespace qt::dist {
namespace {

using Seconds = std::chrono::duration<double>;

RendezvousOptions opts_for(int rank, int world, int port, double connect_s = 10, double op_s = 10) {
  RendezvousOptions o;
  o.rank = rank;
  o.world_size = world;
  o.master_addr = "127.0.0.1";
  o.master_port = port;
  o.connect_timeout_s = connect_s;
  o.op_timeout_s = op_s;
  return o;
}

// Runs body(rank) for each of `ranks` on its own thread, each with its own Rendezvous joined from
// opts(rank); returns each rank's qt::Error message ("" when it finished cleanly).
std::vector<std::string> run_ranks(const std::vector<int>& ranks, const std::function<RendezvousOptions(int)>& opts,
                                   const std::function<void(Rendezvous&)>& body) {
  std::vector<std::string> errors(ranks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        Rendezvous rv(opts(ranks[i]));
        body(rv);
      } catch (const Error& e) {
        errors[i] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

std::vector<int> iota_ranks(int n) {
  std::vector<int> r(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) r[size_t(i)] = i;
  return r;
}

TEST(Rendezvous, BroadcastAllGatherBarrier) {
  const int port = pick_free_port();
  const int world = 5;
  std::string id(128, '\0');  // an ncclUniqueId-like blob: binary, with zero bytes
  for (size_t i = 0; i < id.size(); ++i) id[i] = char((i * 37) & 0xff);
  std::vector<std::string> got_id(world);
  std::vector<std::vector<std::string>> gathered(world);
  const auto errors = run_ranks(iota_ranks(world), [&](int r) { return opts_for(r, world, port); }, [&](Rendezvous& rv) {
    EXPECT_EQ(rv.world_size(), world);
    got_id[size_t(rv.rank())] = rv.broadcast(rv.rank() == 0 ? id : std::string("ignored"));
    gathered[size_t(rv.rank())] = rv.all_gather(std::string(size_t(rv.rank()), char('a' + rv.rank())));
    rv.barrier();
    rv.check_same("settings fingerprint", "sha256:0123");
    rv.shutdown();
  });
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(errors[size_t(r)], "") << "rank " << r;
    EXPECT_EQ(got_id[size_t(r)], id) << "rank " << r;
    ASSERT_EQ(gathered[size_t(r)].size(), size_t(world));
    for (int k = 0; k < world; ++k) EXPECT_EQ(gathered[size_t(r)][size_t(k)], std::string(size_t(k), char('a' + k)));
  }
}

TEST(Rendezvous, WorldOfOneNeedsNoNetwork) {
  Rendezvous rv(opts_for(0, 1, 0));
  EXPECT_EQ(rv.broadcast("x"), "x");
  EXPECT_EQ(rv.all_gather("y"), std::vector<std::string>{"y"});
  rv.check_same("anything", "z");
  rv.shutdown();
}

TEST(Rendezvous, MismatchingFingerprintNamesTheRankOnEveryRank) {
  const int port = pick_free_port();
  const auto errors = run_ranks(iota_ranks(4), [&](int r) { return opts_for(r, 4, port); }, [&](Rendezvous& rv) {
    rv.check_same("settings fingerprint", rv.rank() == 2 ? "lr=0.001" : "lr=0.0001");
  });
  for (const auto& e : errors)
    EXPECT_EQ(e, "[dist] rank 2 has a different settings fingerprint than rank 0 (rank 0: \"lr=0.0001\", rank 2: \"lr=0.001\")");
  const int port2 = pick_free_port();
  const auto two = run_ranks(iota_ranks(4), [&](int r) { return opts_for(r, 4, port2); }, [&](Rendezvous& rv) {
    rv.check_same("data hash", rv.rank() % 2 ? std::string(40, char(rv.rank())) : "h0");
  });
  for (const auto& e : two)
    EXPECT_EQ(e, "[dist] ranks 1, 3 have a different data hash than rank 0 (rank 0: \"h0\", rank 1: 40 bytes "
                 "0101010101010101...)");
}

TEST(Rendezvous, RankThatNeverArrives) {
  const int port = pick_free_port();
  const auto t0 = std::chrono::steady_clock::now();
  const auto errors = run_ranks({0, 1}, [&](int r) { return opts_for(r, 3, port, 1.0); }, [](Rendezvous&) {});
  EXPECT_LT(Seconds(std::chrono::steady_clock::now() - t0).count(), 8.0);
  EXPECT_EQ(errors[0], "[dist] rank 2 did not join within 1 s (rank 0 listens on 127.0.0.1:" + std::to_string(port) +
                           "); were they started, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE=3?");
  EXPECT_EQ(errors[1], "[dist] rank 0 closed the connection during joining (it probably failed: see its output)");
}

TEST(Rendezvous, NoRankZero) {
  const int port = pick_free_port();
  const auto errors = run_ranks({1}, [&](int r) { return opts_for(r, 2, port, 0.5); }, [](Rendezvous&) {});
  EXPECT_EQ(errors[0].rfind("[dist] rank 1 could not connect to rank 0 at 127.0.0.1:" + std::to_string(port) +
                                " in time (last error: Connection refused)", 0),
            0u)
      << errors[0];
}

TEST(Rendezvous, PortInUse) {
  const Fd busy = tcp_listen("127.0.0.1", 0, 1);
  const int port = local_port(busy);
  try {
    Rendezvous rv(opts_for(0, 2, port, 1.0));
    FAIL() << "joined on a busy port";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "[dist] cannot listen on 127.0.0.1:" + std::to_string(port) +
                                         ": the port is in use (another job? choose another MASTER_PORT)");
  }
}

TEST(Rendezvous, NotAnAddressOfThisMachine) {
  RendezvousOptions o = opts_for(0, 2, 29999, 1.0);
  o.master_addr = "192.0.2.1";  // TEST-NET-1: never assigned to a local interface
  try {
    Rendezvous rv(o);
    FAIL() << "listened on a foreign address";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "[dist] cannot listen on 192.0.2.1:29999: 192.0.2.1 is not an address of this "
                                     "machine (MASTER_ADDR must name rank 0's host)");
  }
}

TEST(Rendezvous, StrayClientIsIgnoredAndHostnamesResolve) {
  const int port = pick_free_port();
  std::thread stray([port] {
    try {
      const Fd s = tcp_connect("127.0.0.1", port, deadline_after(5), "stray");
      const std::string junk = "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
      send_all(s, junk.data(), junk.size(), deadline_after(5), "rank 0", "junk");
    } catch (const Error&) {
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the stray client comes first
  auto opts = [&](int r) {
    RendezvousOptions o = opts_for(r, 3, port);
    o.master_addr = "localhost";
    return o;
  };
  std::vector<std::string> all(3);
  const auto errors = run_ranks(iota_ranks(3), opts, [&](Rendezvous& rv) {
    all[size_t(rv.rank())] = rv.all_gather(std::to_string(rv.rank()))[2];
  });
  stray.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(errors[size_t(r)], "");
    EXPECT_EQ(all[size_t(r)], "2");
  }
}

TEST(Rendezvous, OtherProtocolVersion) {
  const int port = pick_free_port();
  std::thread peer([port] {  // a hello as a future protocol version 2 would send it
    unsigned char hello[28] = {'Q', 'T', 'R', 'V', 2, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0};
    try {
      const Fd s = tcp_connect("127.0.0.1", port, deadline_after(5), "rank 1");
      send_all(s, hello, sizeof hello, deadline_after(5), "rank 0", "joining");
      char c;
      recv_all(s, &c, 1, deadline_after(5), "rank 0", "joining");  // until rank 0 hangs up
    } catch (const Error&) {
    }
  });
  try {
    Rendezvous rv(opts_for(0, 2, port, 5.0));
    ADD_FAILURE() << "joined with a version 2 peer";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "[dist] rank 1 speaks rendezvous protocol version 2, rank 0 1: run the same "
                                     "qwentune binary on every rank");
  }
  peer.join();
}

TEST(Rendezvous, WorldSizeMismatch) {
  const int port = pick_free_port();
  const auto errors = run_ranks({0, 1}, [&](int r) { return opts_for(r, r == 0 ? 2 : 3, port, 2.0); },
                                [](Rendezvous&) {});
  EXPECT_EQ(errors[0], "[dist] rank 1 was started with world size 3, rank 0 with 2");
  EXPECT_NE(errors[1], "");
}

TEST(Rendezvous, RankThatDiesMidJob) {
  const int port = pick_free_port();
  const auto errors = run_ranks(iota_ranks(3), [&](int r) { return opts_for(r, 3, port); }, [](Rendezvous& rv) {
    if (rv.rank() == 2) return;  // leaves without the all_gather: its connection closes
    rv.all_gather("x");
  });
  EXPECT_EQ(errors[0], "[dist] rank 2 closed the connection during all_gather #1 (it probably failed: see its output)");
  EXPECT_EQ(errors[1], "[dist] rank 0 closed the connection during all_gather #1 (it probably failed: see its output)");
  EXPECT_EQ(errors[2], "");
}

TEST(Rendezvous, RanksOutOfStepOrTooSlow) {
  const int port = pick_free_port();
  const auto errors = run_ranks(iota_ranks(2), [&](int r) { return opts_for(r, 2, port, 10, 1.0); }, [](Rendezvous& rv) {
    if (rv.rank() == 0) {
      rv.broadcast("b");
      rv.barrier();
    } else {
      rv.all_gather("g");
    }
  });
  EXPECT_EQ(errors[0], "[dist] rank 1 is out of step: expected message type 4 of operation 2 from rank 1, got type 4 "
                       "of operation 1 from rank 1 during all_gather #2 (the ranks took different paths: are their "
                       "settings the same?)");
  EXPECT_EQ(errors[1], "[dist] rank 0 is out of step: expected message type 5 of operation 1 from rank 0, got type 3 "
                       "of operation 1 from rank 0 during all_gather #1 (the ranks took different paths: are their "
                       "settings the same?)");
  const int port2 = pick_free_port();
  const auto slow = run_ranks(iota_ranks(2), [&](int r) { return opts_for(r, 2, port2, 10, 0.5); }, [](Rendezvous& rv) {
    if (rv.rank() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    rv.barrier();
  });
  EXPECT_EQ(slow[0], "[dist] timed out waiting for rank 1 during all_gather #1 (is it stuck, or much slower?)");
}

}  // namespace
}  // namespace qt::dist

namespace qt::cli {
namespace {

LaunchOptions sh_ranks(int n, const std::string& script, const std::string& log_dir) {
  LaunchOptions o;
  o.nprocs = n;
  o.exe = "/bin/sh";
  o.args = {"-c", script};
  o.log_dir = log_dir;
  o.kill_grace_s = 2;
  return o;
}

TEST(Launch, RanksGetTheirEnvironmentAndLogs) {
  test::TempDir dir("launch");
  ::setenv("RANK", "7", 1);  // a stale value in the launcher's environment is replaced
  ::setenv("QT_LAUNCH_TEST_MARKER", "kept", 1);
  const std::string script = "echo \"$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT "
                             "$QT_LAUNCH_TEST_MARKER\" > " + dir.str() + "/env-$RANK; echo hello from rank $RANK";
  const int code = launch_local_ranks(sh_ranks(3, script, dir.str() + "/out"));
  ::unsetenv("RANK");
  ::unsetenv("QT_LAUNCH_TEST_MARKER");
  EXPECT_EQ(code, 0);
  std::string port;
  for (int r = 0; r < 3; ++r) {
    const std::string line = test::read_file(dir.path / ("env-" + std::to_string(r)));
    const std::string head = std::to_string(r) + " 3 " + std::to_string(r) + " 3 127.0.0.1 ";
    ASSERT_EQ(line.rfind(head, 0), 0u) << line;
    const std::string rest = line.substr(head.size());
    const std::string p = rest.substr(0, rest.find(' '));
    EXPECT_GT(std::stoi(p), 0);
    if (r == 0) port = p;
    EXPECT_EQ(p, port);
    EXPECT_EQ(rest.substr(p.size()), " kept\n");
  }
  EXPECT_FALSE(std::filesystem::exists(dir.path / "out" / "rank-0.log"));
  EXPECT_EQ(test::read_file(dir.path / "out" / "rank-1.log"), "hello from rank 1\n");
  EXPECT_EQ(test::read_file(dir.path / "out" / "rank-2.log"), "hello from rank 2\n");
}

TEST(Launch, OneFailingRankStopsTheOthers) {
  test::TempDir dir("launch");
  const auto t0 = std::chrono::steady_clock::now();
  // Rank 1 fails at once; ranks 0 and 2 would run for a minute.
  const int code = launch_local_ranks(sh_ranks(3, "if [ $RANK = 1 ]; then echo boom >&2; exit 3; fi; exec sleep 60", dir.str()));
  EXPECT_EQ(code, 3);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 20.0);
  EXPECT_EQ(test::read_file(dir.path / "rank-1.log"), "boom\n");
}

TEST(Launch, RanksIgnoringSigtermAreKilledAfterTheGrace) {
  test::TempDir dir("launch");
  const auto t0 = std::chrono::steady_clock::now();
  const int code = launch_local_ranks(sh_ranks(2, "if [ $RANK = 1 ]; then exit 5; fi; trap '' TERM; exec sleep 60", dir.str()));
  EXPECT_EQ(code, 5);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 20.0);
}

TEST(Launch, ProgramThatCannotRun) {
  test::TempDir dir("launch");
  LaunchOptions o = sh_ranks(2, "", dir.str());
  o.exe = (dir.path / "no-such-program").string();
  EXPECT_EQ(launch_local_ranks(o), 127);
}

// Starts launch_local_ranks(2 ranks) in a child process of the test, with ranks that write
// ready-R when started and sig-R when SIGTERM reaches them (then exit 143 as the trainer does);
// returns the launcher's pid once both ranks are ready.
pid_t start_launcher_process(const test::TempDir& dir) {
  const std::string d = dir.str();
  const std::string script = "trap 'echo TERM >> " + d + "/sig-$RANK; kill $!; exit 143' TERM; touch " + d +
                             "/ready-$RANK; sleep 60 & wait";
  const pid_t launcher = ::fork();
  if (launcher == 0) {
    int code = 99;
    try {
      code = launch_local_ranks(sh_ranks(2, script, d + "/logs"));
    } catch (...) {
    }
    ::_exit(code);
  }
  for (int i = 0; i < 500 && !(std::filesystem::exists(dir.path / "ready-0") && std::filesystem::exists(dir.path / "ready-1")); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return launcher;
}

// Waits up to 10 s for both ranks to record their SIGTERM.
bool both_ranks_got_sigterm(const test::TempDir& dir) {
  for (int i = 0; i < 500; ++i) {
    if (test::read_file(dir.path / "sig-0") == "TERM\n" && test::read_file(dir.path / "sig-1") == "TERM\n") return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

TEST(Launch, SignalsAreForwardedOnce) {
  test::TempDir dir("launch");
  const pid_t launcher = start_launcher_process(dir);
  ASSERT_GT(launcher, 0);
  ASSERT_TRUE(std::filesystem::exists(dir.path / "ready-1"));
  ::kill(launcher, SIGTERM);
  int status = 0;
  ASSERT_EQ(::waitpid(launcher, &status, 0), launcher);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 143);
  EXPECT_EQ(test::read_file(dir.path / "sig-0"), "TERM\n");
  EXPECT_EQ(test::read_file(dir.path / "sig-1"), "TERM\n");
}

TEST(Launch, RanksDieWithAKilledLauncher) {
  test::TempDir dir("launch");
  const pid_t launcher = start_launcher_process(dir);
  ASSERT_GT(launcher, 0);
  ASSERT_TRUE(std::filesystem::exists(dir.path / "ready-1"));
  ::kill(launcher, SIGKILL);  // no chance to forward anything
  int status = 0;
  ASSERT_EQ(::waitpid(launcher, &status, 0), launcher);
  EXPECT_TRUE(both_ranks_got_sigterm(dir)) << "orphaned ranks kept running";
}

TEST(Launch, GpusOptionIsNotPassedOn) {
  EXPECT_EQ(without_gpus_option({"train", "c.yaml", "--gpus", "4", "--lr", "1"}),
            (std::vector<std::string>{"train", "c.yaml", "--lr", "1"}));
  EXPECT_EQ(without_gpus_option({"train", "--gpus=2", "c.yaml"}), (std::vector<std::string>{"train", "c.yaml"}));
  const auto self = own_command_line();
  ASSERT_FALSE(self.empty());
  EXPECT_NE(self[0].find("qwentune_tests"), std::string::npos);
}

// Runs `qwentune ARGS` with extra environment assignments; returns the exit code and stderr.
std::pair<int, std::string> run_qwentune(const test::TempDir& dir, const std::string& env, const std::string& args) {
  const std::string err = dir.str() + "/stderr.txt";
  const int st = std::system((env + " '" + QT_BINARY + "' " + args + " >/dev/null 2>'" + err + "'").c_str());
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, test::read_file(err)};
}

TEST(Launch, TrainGpusOptionChecksBeforeStarting) {
  test::TempDir dir("launch");
  const std::string cfg = dir.write("train.yaml", "base_model: " + std::string(QT_SOURCE_DIR) +
                                                     "/configs/tiny-qwen3-moe.json\ndatasets:\n  - path: " +
                                                     QT_SOURCE_DIR + "/data/sample/chat.jsonl\n    type: chat\n"
                                                     "max_steps: 1\ndevice: cpu\noutput_dir: " + dir.str() + "/out\n");
  auto [code, err] = run_qwentune(dir, "", "train '" + cfg + "' --gpus 2");
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err, "qwentune: error: [train] --gpus 2: runs one rank per GPU, but this run has device: cpu (start CPU "
                 "ranks with torchrun or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; see docs/distributed.md)\n");
  std::tie(code, err) = run_qwentune(dir, "", "train '" + cfg + "' --gpus 0");
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err, "qwentune: error: [train] --gpus 0: must be at least 1\n");
  std::tie(code, err) = run_qwentune(dir, "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500",
                                     "train '" + cfg + "' --gpus 2");
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err, "qwentune: error: [train] --gpus 2 starts its own ranks; this process is already rank 1 of 2 (local 1 "
                 "of 2), master 127.0.0.1:29500, from torchrun (drop --gpus under torchrun, srun or mpirun)\n");
  std::tie(code, err) = run_qwentune(dir, "RANK=1", "train '" + cfg + "'");
  EXPECT_EQ(code, 1);
  EXPECT_EQ(err, "qwentune: error: [dist] WORLD_SIZE is not set (RANK, WORLD_SIZE and LOCAL_RANK go together, as "
                 "torchrun sets them)\n");
}

}  // namespace
}  // namespace qt::cli
