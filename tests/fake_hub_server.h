// A small HTTP/1.1 server for the Hub tests: one thread, POSIX sockets, bound to 127.0.0.1 on an
// ephemeral port, one request per connection ("Connection: close"); it stops when destroyed or after
// kLifetime, whichever comes first, so a broken test cannot leave it running.
// It serves the Hub's URL layout for one repo:
//   HEAD/GET /ORG/NAME/resolve/{main|COMMIT}/PATH   small files: 200, ETag, X-Repo-Commit
//                                                   LFS files: 302 to {cdn_base}/cdn/SHA256 with
//                                                   X-Linked-Etag, X-Linked-Size, X-Repo-Commit
//   GET /cdn/SHA256                                 the bytes, Range: bytes=N- answered with 206
//   GET /api/models/ORG/NAME/revision/REV           {"sha": COMMIT, "siblings": [{"rfilename": ...}]}
// with 404 + X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), 401 when a token is
// required and missing, a relative 307 from a renamed repo's old name, and per-file faults.
#pragma once
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/sha256.h"

namespace qt::test {

class FakeHub {
 public:
  struct Request {
    std::string method, target;
    std::map<std::string, std::string> headers;  // names lowercase
  };
  struct File {
    std::string content;
    bool lfs = false;
  };

  // Repo contents and behaviour; set them before the requests that depend on them.
  std::string repo_id = "Org/Model";
  std::string commit = "0123456789abcdef0123456789abcdef01234567";
  std::string renamed_from;    // "Old/Name": its URLs answer 307 to the same path under repo_id
  std::string cdn_base;        // LFS redirect target base; "" = this server
  std::string required_token;  // non-empty: repo URLs answer 401 unless "Authorization: Bearer <it>"
  std::map<std::string, File> files;
  std::set<std::string> drop_once;     // GET: half the body, then the connection is closed (first time only)
  std::set<std::string> corrupt;       // GET: the first byte flipped
  std::set<std::string> ignore_range;  // GET: 200 with the whole body even when Range was asked
  std::set<std::string> get_redirect;  // small file, GET only: 302 to {cdn_base}/cdn/SHA256
  std::set<std::string> expire_once;   // GET /cdn/: 403 the first time (an expired signed URL)

  FakeHub() {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd_, 16) != 0)
      throw std::runtime_error("fake hub: cannot listen on 127.0.0.1");
    socklen_t len = sizeof a;
    ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeHub() {
    stop_ = true;
    thread_.join();
    ::close(fd_);
  }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::vector<Request> requests() const {
    std::lock_guard<std::mutex> g(mu_);
    return log_;
  }
  size_t request_count() const {
    std::lock_guard<std::mutex> g(mu_);
    return log_.size();
  }
  std::mutex& mutex() { return mu_; }  // hold it while changing the settings above mid-test

 private:
  static constexpr auto kLifetime = std::chrono::seconds(120);

  void serve() {
    const auto deadline = std::chrono::steady_clock::now() + kLifetime;
    while (!stop_ && std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const int c = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      handle(c);
      ::close(c);
    }
  }

  static bool read_head(int c, std::string& head) {
    char buf[4096];
    while (head.find("\r\n\r\n") == std::string::npos && head.size() < 65536) {
      pollfd p{c, POLLIN, 0};
      if (::poll(&p, 1, 5000) <= 0) return false;
      const ssize_t n = ::recv(c, buf, sizeof buf, 0);
      if (n <= 0) return false;
      head.append(buf, size_t(n));
    }
    return true;
  }

  static void send_all(int c, const std::string& s) {
    size_t done = 0;
    while (done < s.size()) {
      const ssize_t n = ::send(c, s.data() + done, s.size() - done, MSG_NOSIGNAL);
      if (n <= 0) return;
      done += size_t(n);
    }
  }

  struct Reply {
    int status = 200;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string body;
    size_t send_only = std::string::npos;  // fault: stop after this many body bytes and close
  };

  static void respond(int c, const Request& req, const Reply& r) {
    static const std::map<int, const char*> kReason = {{200, "OK"}, {206, "Partial Content"}, {302, "Found"},
                                                       {307, "Temporary Redirect"}, {401, "Unauthorized"}, {403, "Forbidden"},
                                                       {404, "Not Found"}, {416, "Range Not Satisfiable"}};
    std::string out = "HTTP/1.1 " + std::to_string(r.status) + " " + kReason.at(r.status) + "\r\n";
    for (const auto& [k, v] : r.headers) out += k + ": " + v + "\r\n";
    out += "Content-Length: " + std::to_string(r.body.size()) + "\r\nConnection: close\r\n\r\n";
    if (req.method == "GET") out += r.body.substr(0, r.send_only);
    send_all(c, out);
  }

  static Reply error(int status, const std::string& code) {
    Reply r;
    r.status = status;
    r.headers.push_back({"X-Error-Code", code});
    r.body = "{\"error\": \"" + code + "\"}";
    return r;
  }

  const File* file_by_sha(const std::string& sha, std::string* name) const {
    for (const auto& [n, f] : files)
      if (qt::sha256_hex(f.content) == sha) {
        *name = n;
        return &f;
      }
    return nullptr;
  }

  Reply serve_bytes(const Request& req, const std::string& name, const File& f) {
    Reply r;
    std::string body = f.content;
    if (req.method == "GET" && corrupt.count(name) && !body.empty()) body[0] = char(body[0] ^ 0x5a);
    auto range = req.headers.find("range");
    if (range != req.headers.end() && !ignore_range.count(name) && range->second.rfind("bytes=", 0) == 0) {
      const size_t from = std::stoull(range->second.substr(6));
      if (from >= body.size()) return error(416, "RangeNotSatisfiable");
      r.status = 206;
      r.headers.push_back({"Content-Range", "bytes " + std::to_string(from) + "-" + std::to_string(body.size() - 1) +
                                                "/" + std::to_string(body.size())});
      body = body.substr(from);
    }
    if (req.method == "GET" && drop_once.count(name)) {
      drop_once.erase(name);
      r.send_only = body.size() / 2;
    }
    r.body = std::move(body);
    return r;
  }

  Reply route(const Request& req) {
    const std::string& t = req.target;
    const std::string cdn = cdn_base.empty() ? url() : cdn_base;
    if (t.rfind("/cdn/", 0) == 0) {
      std::string name;
      const File* f = file_by_sha(t.substr(5), &name);
      if (f && expire_once.erase(name)) return error(403, "SignatureExpired");
      return f ? serve_bytes(req, name, *f) : error(404, "EntryNotFound");
    }
    if (!renamed_from.empty() && t.rfind("/" + renamed_from + "/", 0) == 0) {
      Reply r;
      r.status = 307;
      r.headers.push_back({"Location", "/" + repo_id + t.substr(renamed_from.size() + 1)});
      return r;
    }
    const bool api = t.rfind("/api/models/" + repo_id + "/revision/", 0) == 0;
    const std::string prefix = "/" + repo_id + "/resolve/";
    if (!api && t.rfind(prefix, 0) != 0) return error(404, "RepoNotFound");
    if (!required_token.empty()) {
      auto auth = req.headers.find("authorization");
      if (auth == req.headers.end() || auth->second != "Bearer " + required_token) return error(401, "GatedRepo");
    }
    const std::string rest = api ? t.substr(("/api/models/" + repo_id + "/revision/").size()) : t.substr(prefix.size());
    const size_t slash = rest.find('/');
    const std::string rev = rest.substr(0, slash);
    if (rev != "main" && rev != commit) return error(404, "RevisionNotFound");
    if (api) {
      nlohmann::json j = {{"sha", commit}, {"siblings", nlohmann::json::array()}};
      for (const auto& [n, f] : files) j["siblings"].push_back({{"rfilename", n}});
      Reply r;
      r.body = j.dump();
      return r;
    }
    const std::string name = slash == std::string::npos ? "" : rest.substr(slash + 1);
    auto it = files.find(name);
    if (it == files.end()) {
      Reply r = error(404, "EntryNotFound");
      r.headers.push_back({"X-Repo-Commit", commit});
      return r;
    }
    const std::string sha = qt::sha256_hex(it->second.content);
    const std::string size = std::to_string(it->second.content.size());
    if (it->second.lfs || (req.method == "GET" && get_redirect.count(name))) {
      Reply r;
      r.status = 302;
      r.headers = {{"Location", cdn + "/cdn/" + sha}, {"X-Repo-Commit", commit}, {"ETag", "\"" + sha.substr(0, 40) + "\""}};
      if (it->second.lfs) {
        r.headers.push_back({"X-Linked-Etag", "\"" + sha + "\""});
        r.headers.push_back({"X-Linked-Size", size});
      }
      return r;
    }
    Reply r = serve_bytes(req, name, it->second);
    r.headers.push_back({"X-Repo-Commit", commit});
    r.headers.push_back({"ETag", "W/\"" + sha.substr(0, 40) + "\""});
    return r;
  }

  void handle(int c) {
    std::string head;
    if (!read_head(c, head)) return;
    Request req;
    const size_t line_end = head.find("\r\n");
    const std::string first = head.substr(0, line_end);
    const size_t s1 = first.find(' '), s2 = first.find(' ', s1 + 1);
    req.method = first.substr(0, s1);
    req.target = first.substr(s1 + 1, s2 - s1 - 1);
    for (size_t p = line_end + 2; p < head.size();) {
      const size_t e = head.find("\r\n", p);
      const std::string line = head.substr(p, e - p);
      if (line.empty()) break;
      const size_t colon = line.find(':');
      std::string k = line.substr(0, colon);
      for (char& ch : k) ch = char(std::tolower(static_cast<unsigned char>(ch)));
      req.headers[k] = line.substr(line.find_first_not_of(' ', colon + 1));
      p = e + 2;
    }
    std::lock_guard<std::mutex> g(mu_);
    log_.push_back(req);
    respond(c, req, route(req));
  }

  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  mutable std::mutex mu_;
  std::vector<Request> log_;
};

}  // namespace qt::test
