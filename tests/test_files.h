// Small helpers shared by the tests: a unique temporary folder removed at scope exit, whole-file
// reads, and running a shell command with its output captured.
#pragma once
#include <stdlib.h>
#include <sys/wait.h>

#include <cstdio>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#ifdef QT_HAVE_CUDA
#include "ops/cuda/runtime.h"
#endif

namespace qt::test {

// What `--device cuda` fails with where it cannot run (a CPU-only build, or no visible GPU); null
// where it can (the test_cuda_* tests cover the device there).
inline const char* cuda_device_refusal() {
#ifdef QT_HAVE_CUDA
  return qt::cuda::device_count() == 0 ? "no CUDA device is visible" : nullptr;
#else
  return "this build has no CUDA backend";
#endif
}

// A fresh folder under the system temp dir, named qt_test_<tag>_XXXXXX (mkdtemp: unique across the
// parallel test processes), removed with everything in it when the object goes out of scope.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag = "tmp") {
    std::string t = (std::filesystem::temp_directory_path() / ("qt_test_" + tag + "_XXXXXX")).string();
    if (::mkdtemp(t.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + t);
    path = t;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
  // Writes `text` to path/name and returns that file's path.
  std::string write(const std::string& name, const std::string& text) const {
    std::ofstream(path / name, std::ios::binary) << text;
    return (path / name).string();
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

// The whole file as bytes ("" when it cannot be read).
inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `cmd` through /bin/sh; status = its exit code (-1 when it did not exit normally), output =
// what it wrote to stdout (redirect stderr in cmd with 2>&1 to capture it too).
struct CommandResult {
  int status = -1;
  std::string output;
};
inline CommandResult run_command(const std::string& cmd) {
  CommandResult r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = ::pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace qt::test
