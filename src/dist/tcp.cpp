// Sockets with deadlines (see tcp.h).
#include "dist/tcp.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <thread>

#include "core/error.h"

namespace qt::dist {
namespace {

using AddrList = std::unique_ptr<addrinfo, decltype(&freeaddrinfo)>;

AddrList resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc = getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
  if (rc != 0) fail("dist", "cannot resolve {} (MASTER_ADDR): {}", host, gai_strerror(rc));
  return AddrList(res, freeaddrinfo);
}

int ms_left(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return left <= 0 ? 0 : int(std::min<long long>(left, 1 << 30));
}

// Waits for `events` on fd; false at the deadline.
bool wait_for(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int rc = ::poll(&p, 1, ms_left(deadline));
    if (rc > 0) return true;
    if (rc == 0) return false;
    if (errno != EINTR) fail("dist", "poll: {}", std::strerror(errno));
  }
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

}  // namespace

Clock::time_point deadline_after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

void Fd::reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Fd tcp_listen(const std::string& host, int port, int backlog) {
  const AddrList addrs = resolve(host, port, true);
  int last_err = 0;
  for (addrinfo* a = addrs.get(); a; a = a->ai_next) {
    Fd s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (!s.valid()) {
      last_err = errno;
      continue;
    }
    int one = 1;  // a port in TIME_WAIT from an earlier job is reusable; a listening one is not
    ::setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(s.get(), a->ai_addr, a->ai_addrlen) == 0 && ::listen(s.get(), backlog) == 0) return s;
    last_err = errno;
  }
  if (last_err == EADDRINUSE)
    fail("dist", "cannot listen on {}:{}: the port is in use (another job? choose another MASTER_PORT)", host, port);
  if (last_err == EADDRNOTAVAIL)
    fail("dist", "cannot listen on {}:{}: {} is not an address of this machine (MASTER_ADDR must name rank 0's host)",
         host, port, host);
  fail("dist", "cannot listen on {}:{}: {}", host, port, std::strerror(last_err));
}

int local_port(const Fd& sock) {
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  if (::getsockname(sock.get(), reinterpret_cast<sockaddr*>(&ss), &len) != 0)
    fail("dist", "getsockname: {}", std::strerror(errno));
  if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

Fd tcp_accept(const Fd& listener, Clock::time_point deadline) {
  while (wait_for(listener.get(), POLLIN, deadline)) {
    Fd s(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (s.valid()) {
      set_nodelay(s.get());
      return s;
    }
    if (errno != EINTR && errno != ECONNABORTED && errno != EAGAIN)
      fail("dist", "accept: {}", std::strerror(errno));
  }
  return Fd();
}

Fd tcp_connect(const std::string& host, int port, Clock::time_point deadline, const std::string& who) {
  int last_err = 0;
  for (;;) {
    const AddrList addrs = resolve(host, port, false);
    for (addrinfo* a = addrs.get(); a; a = a->ai_next) {
      Fd s(::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol));
      if (!s.valid()) {
        last_err = errno;
        continue;
      }
      int rc = ::connect(s.get(), a->ai_addr, a->ai_addrlen);
      if (rc != 0 && errno == EINPROGRESS) {
        if (!wait_for(s.get(), POLLOUT, std::min(deadline, Clock::now() + std::chrono::seconds(2)))) {
          last_err = ETIMEDOUT;
          continue;
        }
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        rc = err == 0 ? 0 : -1;
        errno = err;
      }
      if (rc == 0) {
        const int flags = ::fcntl(s.get(), F_GETFL);
        ::fcntl(s.get(), F_SETFL, flags & ~O_NONBLOCK);
        set_nodelay(s.get());
        return s;
      }
      last_err = errno;
    }
    if (Clock::now() >= deadline)
      fail("dist", "{} could not connect to rank 0 at {}:{} in time (last error: {}); is rank 0 running and "
           "MASTER_ADDR/MASTER_PORT the same on every rank?", who, host, port, std::strerror(last_err));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

void send_all(const Fd& s, const void* data, size_t n, Clock::time_point deadline, const std::string& who,
              const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    if (!wait_for(s.get(), POLLOUT, deadline))
      fail("dist", "timed out sending to {} during {} (is it stuck?)", who, what);
    const ssize_t k = ::send(s.get(), p, n, MSG_NOSIGNAL);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      fail("dist", "lost the connection to {} during {}: {} (it probably failed: see its output)", who, what,
           std::strerror(errno));
    }
    p += k;
    n -= size_t(k);
  }
}

void recv_all(const Fd& s, void* data, size_t n, Clock::time_point deadline, const std::string& who,
              const std::string& what) {
  char* p = static_cast<char*>(data);
  while (n > 0) {
    if (!wait_for(s.get(), POLLIN, deadline))
      fail("dist", "timed out waiting for {} during {} (is it stuck, or much slower?)", who, what);
    const ssize_t k = ::recv(s.get(), p, n, 0);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      fail("dist", "lost the connection to {} during {}: {} (it probably failed: see its output)", who, what,
           std::strerror(errno));
    }
    if (k == 0) fail("dist", "{} closed the connection during {} (it probably failed: see its output)", who, what);
    p += k;
    n -= size_t(k);
  }
}

int pick_free_port(const std::string& host) {
  const Fd s = tcp_listen(host, 0, 1);
  return local_port(s);
}

}  // namespace qt::dist
