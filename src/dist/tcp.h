// Plain TCP for the rendezvous: an owning socket, listen / connect with retries, and whole-buffer
// reads and writes that give up at a deadline. IPv4, IPv6 and host names (getaddrinfo). Every
// failure is a user-facing qt::fail("dist", ...) that names the peer (`who`) and the address.
#pragma once
#include <chrono>
#include <cstddef>
#include <string>
#include <utility>

namespace qt::dist {

using Clock = std::chrono::steady_clock;
Clock::time_point deadline_after(double seconds);

// An owned file descriptor, closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset();

 private:
  int fd_ = -1;
};

// A listening socket on host:port (host: an address or name of this machine; port 0 = any free one).
Fd tcp_listen(const std::string& host, int port, int backlog);
int local_port(const Fd& sock);
// Accepts one connection, or returns an invalid Fd when none arrives before `deadline`.
Fd tcp_accept(const Fd& listener, Clock::time_point deadline);
// Connects to host:port, retrying refused / unreachable attempts every 100 ms until `deadline`.
Fd tcp_connect(const std::string& host, int port, Clock::time_point deadline, const std::string& who);

// Whole-buffer transfers; `who` names the peer in errors ("rank 3"), `what` the operation.
void send_all(const Fd& s, const void* data, size_t n, Clock::time_point deadline, const std::string& who,
              const std::string& what);
void recv_all(const Fd& s, void* data, size_t n, Clock::time_point deadline, const std::string& who,
              const std::string& what);

// A TCP port that was free on `host` a moment ago (bind to port 0, read it, close).
int pick_free_port(const std::string& host = "127.0.0.1");

}  // namespace qt::dist
