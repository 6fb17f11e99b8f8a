// Hub HTTP client (see hub_http.h). Retry policy: connection failures, drops mid-body, stalls (no byte
// for stall_timeout_s), HTTP 408/429/5xx are retried up to max_attempts times with exponential
// backoff; a download attempt that received bytes resets the count, since it made progress. Anything
// else (401/403/404, bad metadata, disk full, checksum mismatch) fails at once with one clear line,
// except an expired CDN URL (401/403/410 from a redirect target), refreshed once by a new HEAD.
#include "io/hub_http.h"

#include <curl/curl.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/sha256.h"

namespace qt::hub {

struct HubClient::Request {
  std::string url;
  bool head = false;
  bool follow = false;       // follow redirects (libcurl drops the Authorization header on a host change)
  int64_t range_from = -1;   // >= 0: "Range: bytes=N-"
  // Receives the body of a 2xx response; returning false aborts the transfer. Unset: the body is
  // collected into Response::body.
  std::function<bool(long status, const std::map<std::string, std::string>& headers, const char*, size_t)> on_body;
};

struct HubClient::Response {
  CURLcode code = CURLE_OK;
  long status = 0;
  std::map<std::string, std::string> headers;  // of the last response; names lowercase
  std::string body, error, redirect_url;
};

namespace {

constexpr const char* kCtx = "hub";
constexpr size_t kMaxTextBody = size_t(64) << 20;

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

std::string header(const std::map<std::string, std::string>& h, const std::string& name) {
  auto it = h.find(name);
  return it == h.end() ? std::string() : it->second;
}

// scheme://host:port, lowercase, default port made explicit: the unit the token is confined to.
std::string origin_of(const std::string& url) {
  const size_t p = url.find("://");
  if (p == std::string::npos) return "";
  const std::string scheme = lower(url.substr(0, p));
  const size_t start = p + 3, end = url.find_first_of("/?#", start);
  std::string authority = lower(url.substr(start, end == std::string::npos ? std::string::npos : end - start));
  if (size_t at = authority.rfind('@'); at != std::string::npos) authority.erase(0, at + 1);
  const size_t bracket = authority.rfind(']');
  const size_t colon = authority.rfind(':');
  if (colon == std::string::npos || (bracket != std::string::npos && colon < bracket))
    authority += scheme == "https" ? ":443" : ":80";
  return scheme + "://" + authority;
}

bool is_relative_location(const std::string& loc) {
  return loc.find("://") == std::string::npos && !(loc.size() >= 2 && loc[0] == '/' && loc[1] == '/');
}

bool transient_curl(CURLcode c) {
  switch (c) {
    case CURLE_COULDNT_CONNECT: case CURLE_OPERATION_TIMEDOUT: case CURLE_PARTIAL_FILE:
    case CURLE_RECV_ERROR: case CURLE_SEND_ERROR: case CURLE_GOT_NOTHING: case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM: case CURLE_SSL_CONNECT_ERROR:
      return true;
    default:
      return false;
  }
}

bool transient_status(long s) { return s == 408 || s == 429 || s == 500 || s == 502 || s == 503 || s == 504; }

void ensure_curl_global_init() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) fail(kCtx, "libcurl failed to initialise");
  });
}

std::string format_bytes(double n) {
  static const char* kUnits[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (n >= 1000 && u < 4) {
    n /= 1000;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", n) : fmt::format("{:.2f} {}", n, kUnits[u]);
}

// Progress of one file on stderr: a live line on a TTY (at most 10 updates a second), else one line
// when the file is done.
class Progress {
 public:
  Progress(bool enabled, std::string name, int64_t total, int64_t resumed_at)
      : enabled_(enabled), tty_(enabled && ::isatty(2)), name_(std::move(name)), total_(total),
        first_byte_(resumed_at), start_(Clock::now()), last_(start_) {
    if (enabled_ && resumed_at > 0) std::fprintf(stderr, "%s: resuming at %s\n", name_.c_str(), format_bytes(double(resumed_at)).c_str());
  }
  void update(int64_t done) {
    if (!tty_) return;
    const auto now = Clock::now();
    if (now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    print_line(done, "\r", "\x1b[K");
  }
  void finish(int64_t done) {
    if (!enabled_) return;
    if (tty_) print_line(done, "\r", "\x1b[K\n");
    else print_line(done, "", "\n");
  }
  void restarted() { first_byte_ = 0; }

 private:
  using Clock = std::chrono::steady_clock;
  void print_line(int64_t done, const char* pre, const char* post) {
    const double secs = std::chrono::duration<double>(Clock::now() - start_).count();
    const double rate = secs > 0 ? double(done - first_byte_) / secs / 1e6 : 0.0;
    const std::string total = total_ >= 0 ? " / " + format_bytes(double(total_)) : "";
    std::fprintf(stderr, "%s%s  %s%s  %.1f MB/s%s", pre, name_.c_str(), format_bytes(double(done)).c_str(),
                 total.c_str(), rate, post);
    std::fflush(stderr);
  }
  bool enabled_, tty_;
  std::string name_;
  int64_t total_, first_byte_;
  Clock::time_point start_, last_;
};

bool write_all(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= size_t(w);
  }
  return true;
}

// Feeds the first n bytes of path into h (the part of a download that is already on disk).
void hash_prefix(const std::string& path, int64_t n, Sha256& h) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(kCtx, "{}: cannot read ({})", path, std::strerror(errno));
  std::vector<char> buf(1 << 20);
  while (n > 0) {
    const ssize_t r = ::read(fd, buf.data(), size_t(std::min<int64_t>(n, int64_t(buf.size()))));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      ::close(fd);
      fail(kCtx, "{}: read error", path);
    }
    h.update(buf.data(), size_t(r));
    n -= r;
  }
  ::close(fd);
}

int64_t parse_size(const std::string& s) {
  if (s.empty() || s.size() > 18 || s.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(s);
}

// "bytes START-END/TOTAL" -> START, or -1.
int64_t content_range_start(const std::string& v) {
  if (v.rfind("bytes ", 0) != 0) return -1;
  const size_t dash = v.find('-', 6);
  return dash == std::string::npos ? -1 : parse_size(v.substr(6, dash - 6));
}

bool is_hex(const std::string& s, size_t len) {
  return s.size() == len && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// An etag becomes a file name under blobs/: only plain characters.
bool is_safe_etag(const std::string& e) {
  if (e.empty() || e.size() > 128 || e[0] == '.') return false;
  for (char c : e)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') return false;
  return true;
}

std::string read_token_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return "";
  char buf[4096];
  const size_t n = std::fread(buf, 1, sizeof buf, f);
  std::fclose(f);
  return trim(std::string_view(buf, n));
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? trim(v) : std::string();
}

}  // namespace

std::string url_encode(const std::string& s, bool keep_slash) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) out.push_back(char(c));
    else out += fmt::format("%{:02X}", c);
  }
  return out;
}

std::string resolve_url(const std::string& endpoint, const std::string& repo_id, const std::string& revision,
                        const std::string& path) {
  return fmt::format("{}/{}/resolve/{}/{}", endpoint, repo_id, url_encode(revision, false), url_encode(path, true));
}

bool is_sha256_etag(const std::string& etag) { return is_hex(etag, 64); }

std::string effective_endpoint(const HubOptions& opts) {
  std::string e = !opts.endpoint.empty() ? opts.endpoint : env_or_empty("HF_ENDPOINT");
  if (e.empty()) e = "https://huggingface.co";
  while (!e.empty() && e.back() == '/') e.pop_back();
  return e;
}

std::string effective_token(const HubOptions& opts) {
  if (opts.token) return *opts.token;
  for (const char* name : {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
    if (std::string t = env_or_empty(name); !t.empty()) return t;
  const std::string path = env_or_empty("HF_TOKEN_PATH");
  return read_token_file(!path.empty() ? path : hf_home_dir() + "/token");
}

HubClient::HubClient(const HubOptions& opts)
    : opts_(opts), endpoint_(effective_endpoint(opts)), token_(effective_token(opts)) {
  ensure_curl_global_init();
  curl_ = curl_easy_init();
  if (!curl_) fail(kCtx, "libcurl could not create a handle");
}

HubClient::~HubClient() { curl_easy_cleanup(static_cast<CURL*>(curl_)); }

HubClient::Response HubClient::perform(const Request& req) {
  CURL* c = static_cast<CURL*>(curl_);
  curl_easy_reset(c);
  ++requests_;
  Response resp;
  struct Ctx {
    const Request* req;
    Response* resp;
  } ctx{&req, &resp};
  char errbuf[CURL_ERROR_SIZE] = {0};
  curl_slist* hdrs = curl_slist_append(nullptr, "Accept-Encoding: identity");
  // The token goes to the endpoint's own origin only; on a redirect to another host libcurl drops
  // this header (custom Authorization headers are not forwarded across hosts or ports).
  if (!token_.empty() && origin_of(req.url) == origin_of(endpoint_))
    hdrs = curl_slist_append(hdrs, ("Authorization: Bearer " + token_).c_str());
  curl_easy_setopt(c, CURLOPT_URL, req.url.c_str());
  curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(c, CURLOPT_UNRESTRICTED_AUTH, 0L);
  curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
  curl_easy_setopt(c, CURLOPT_USERAGENT, "qwentune/0.1.0");
  curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, req.follow ? 1L : 0L);
  curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
  curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, opts_.connect_timeout_s);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, opts_.stall_timeout_s);
  if (req.head) curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
  const std::string range = fmt::format("{}-", req.range_from);
  if (req.range_from >= 0) curl_easy_setopt(c, CURLOPT_RANGE, range.c_str());
  auto on_header = +[](char* p, size_t size, size_t n, void* ud) -> size_t {
    auto* r = static_cast<Ctx*>(ud)->resp;
    const std::string_view line(p, size * n);
    if (line.rfind("HTTP/", 0) == 0) {  // a new response (after a redirect): start over
      r->headers.clear();
      const size_t sp = line.find(' ');
      r->status = sp == std::string_view::npos ? 0 : std::atol(std::string(line.substr(sp + 1, 3)).c_str());
    } else if (size_t colon = line.find(':'); colon != std::string_view::npos) {
      r->headers[lower(std::string(line.substr(0, colon)))] = trim(line.substr(colon + 1));
    }
    return size * n;
  };
  auto on_body = +[](char* p, size_t size, size_t n, void* ud) -> size_t {
    auto* x = static_cast<Ctx*>(ud);
    const size_t bytes = size * n;
    const bool ok_status = x->resp->status == 200 || x->resp->status == 206;
    if (x->req->on_body && ok_status) return x->req->on_body(x->resp->status, x->resp->headers, p, bytes) ? bytes : 0;
    if (x->resp->body.size() + bytes > kMaxTextBody) return 0;
    x->resp->body.append(p, bytes);
    return bytes;
  };
  curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(c, CURLOPT_HEADERDATA, &ctx);
  curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(c, CURLOPT_WRITEDATA, &ctx);
  resp.code = curl_easy_perform(c);
  curl_slist_free_all(hdrs);
  long status = 0;
  if (curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status) == CURLE_OK && status != 0) resp.status = status;
  char* redirect = nullptr;
  if (curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &redirect) == CURLE_OK && redirect) resp.redirect_url = redirect;
  if (resp.code != CURLE_OK) resp.error = errbuf[0] ? errbuf : curl_easy_strerror(resp.code);
  return resp;
}

namespace {

[[noreturn]] void fail_for(long status, CURLcode code, const std::string& curl_error,
                           const std::map<std::string, std::string>& headers, const std::string& url,
                           const FileTarget& t, bool token_sent) {
  if (code != CURLE_OK)
    fail(kCtx, "cannot download {} from {}: {}; check the network or proxy, or set HF_HUB_OFFLINE=1 to use only "
         "the local cache", t.path, url, curl_error);
  const std::string ecode = header(headers, "x-error-code");
  const std::string emsg = header(headers, "x-error-message");
  const std::string hint = token_sent ? "the token sent was refused" : "no token was sent";
  if (status == 401 || status == 403) {
    if (ecode == "GatedRepo")
      fail(kCtx, "{} is a gated repo (HTTP {}): accept its conditions on the Hub, then set HF_TOKEN to a token of "
           "that account ({})", t.repo_id, status, hint);
    if (ecode == "RepoNotFound")
      fail(kCtx, "repository {} not found, or private (HTTP {}): check the id; if it is private or gated set "
           "HF_TOKEN to a token with access ({})", t.repo_id, status, hint);
    fail(kCtx, "access to {} denied (HTTP {}) for {}: the repo is gated or private; set HF_TOKEN (or save a token "
         "in $HF_HOME/token) to a token with access ({})", t.repo_id, status, t.path, hint);
  }
  if (status == 404) {
    if (ecode == "RepoNotFound") fail(kCtx, "repository {} not found on the Hub (HTTP 404)", t.repo_id);
    if (ecode == "RevisionNotFound") fail(kCtx, "revision '{}' not found in {} (HTTP 404)", t.revision, t.repo_id);
    if (ecode == "EntryNotFound") fail(kCtx, "{}@{} has no file {} (HTTP 404)", t.repo_id, t.revision, t.path);
    fail(kCtx, "{}: not found (HTTP 404): no such repository, revision or file", url);
  }
  fail(kCtx, "{}: HTTP {}{}{}", url, status, emsg.empty() ? "" : ": ", emsg);
}

}  // namespace

template <typename Attempt>
HubClient::Response HubClient::with_retries(const std::string& url, const FileTarget& t, Attempt&& attempt) {
  const int max_attempts = std::max(1, opts_.max_attempts);
  for (int failures = 1;; ++failures) {
    bool progressed = false;
    Response r = attempt(progressed);
    const bool transient = r.code != CURLE_OK ? transient_curl(r.code) : transient_status(r.status);
    if (!transient) return r;
    if (progressed) failures = 1;
    if (failures >= max_attempts) {
      r.error += fmt::format(" (after {} attempts)", failures);
      return r;
    }
    const int ms = opts_.retry_base_ms * (1 << std::min(failures - 1, 4));
    if (opts_.progress)
      std::fprintf(stderr, "%s: %s; retrying in %.1f s\n", t.path.c_str(),
                   r.code != CURLE_OK ? r.error.c_str() : fmt::format("HTTP {}", r.status).c_str(), ms / 1000.0);
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  }
}

std::optional<FileMeta> HubClient::file_meta(const FileTarget& t, bool missing_ok) {
  std::string url = resolve_url(endpoint_, t.repo_id, t.revision, t.path);
  FileMeta meta;
  for (int hop = 0;; ++hop) {
    Response r = with_retries(url, t, [&](bool&) {
      Request q;
      q.url = url;
      q.head = true;
      return perform(q);
    });
    const bool redirect = r.code == CURLE_OK && r.status >= 301 && r.status <= 308 && r.status != 304;
    if (redirect) {
      const std::string loc = header(r.headers, "location");
      if (loc.empty() || r.redirect_url.empty()) fail(kCtx, "{}: HTTP {} without a Location", url, r.status);
      if (is_relative_location(loc) && hop < 5) {  // a renamed repo: ask again at the new name
        url = r.redirect_url;
        continue;
      }
      meta.url = r.redirect_url;  // an LFS file on the CDN: the metadata is in this response
    } else if (r.code == CURLE_OK && r.status == 404 && missing_ok &&
               (header(r.headers, "x-error-code").empty() || header(r.headers, "x-error-code") == "EntryNotFound")) {
      return std::nullopt;
    } else if (r.code != CURLE_OK || r.status != 200) {
      fail_for(r.status, r.code, r.error, r.headers, url, t, !token_.empty());
    } else {
      meta.url = url;
    }
    meta.commit = header(r.headers, "x-repo-commit");
    if (!is_hex(meta.commit, 40))
      fail(kCtx, "{}: the server sent no valid X-Repo-Commit header ('{}'); is {} a Hugging Face Hub endpoint?", url,
           meta.commit, endpoint_);
    std::string etag = header(r.headers, "x-linked-etag");
    if (etag.empty()) etag = header(r.headers, "etag");
    if (etag.rfind("W/", 0) == 0) etag.erase(0, 2);
    while (!etag.empty() && etag.front() == '"') etag.erase(0, 1);
    while (!etag.empty() && etag.back() == '"') etag.pop_back();
    if (!is_safe_etag(etag)) fail(kCtx, "{}: the server sent no usable ETag ('{}')", url, etag);
    meta.etag = etag;
    std::string size = header(r.headers, "x-linked-size");
    meta.size = parse_size(size.empty() ? header(r.headers, "content-length") : size);
    return meta;
  }
}

std::string HubClient::get_text(const std::string& url, const FileTarget& t) {
  Response r = with_retries(url, t, [&](bool&) {
    Request q;
    q.url = url;
    q.follow = true;
    return perform(q);
  });
  if (r.code != CURLE_OK || r.status != 200)
    fail_for(r.status, r.code, r.error, r.headers, url, t, !token_.empty());
  return std::move(r.body);
}

void HubClient::download(const FileMeta& meta, const FileTarget& t, const std::string& partial_path) {
  const bool check_sha = is_sha256_etag(meta.etag);
  const int fd = ::open(partial_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) fail(kCtx, "{}: cannot create ({})", partial_path, std::strerror(errno));
  struct FdGuard {
    int fd;
    ~FdGuard() { ::close(fd); }
  } guard{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail(kCtx, "{}: cannot stat", partial_path);
  int64_t have = st.st_size;
  Sha256 hasher;
  auto restart = [&] {
    if (::ftruncate(fd, 0) != 0) fail(kCtx, "{}: cannot truncate ({})", partial_path, std::strerror(errno));
    have = 0;
    hasher = Sha256();
  };
  if (meta.size >= 0 && have > meta.size) restart();
  if (check_sha && have > 0) hash_prefix(partial_path, have, hasher);
  Progress progress(opts_.progress, t.path, meta.size, have);
  int write_errno = 0;

  std::string url = meta.url;
  auto attempt = [&](bool& progressed) {
    Response resp;
    for (int pass = 0; pass < 2; ++pass) {  // a second pass only after a restart from byte 0
      if (meta.size >= 0 && have == meta.size) return Response{};  // already complete on disk
      bool first = true, bad_range = false;
      const int64_t before = have;
      Request q;
      q.url = url;
      q.follow = true;
      q.range_from = have > 0 ? have : -1;
      q.on_body = [&](long status, const std::map<std::string, std::string>& h, const char* p, size_t n) {
        if (first) {
          first = false;
          if (status == 200 && have > 0) {  // the server ignored Range: take the whole file again
            restart();
            progress.restarted();
          }
          if (status == 206 && content_range_start(header(h, "content-range")) != have) {
            bad_range = true;
            return false;
          }
        }
        errno = 0;
        if (!write_all(fd, p, n)) {
          write_errno = errno ? errno : EIO;
          return false;
        }
        if (check_sha) hasher.update(p, n);
        have += int64_t(n);
        progress.update(have);
        return true;
      };
      resp = perform(q);
      progressed = have > before;
      if (write_errno != 0) return resp;
      if (bad_range || resp.status == 416) {  // the partial file does not fit the server's: start over
        restart();
        progress.restarted();
        continue;
      }
      if (resp.code == CURLE_OK && (resp.status == 200 || resp.status == 206) && meta.size >= 0 && have < meta.size) {
        resp.code = CURLE_PARTIAL_FILE;  // closed cleanly but early: resume like a drop
        resp.error = fmt::format("the connection closed after {} of {} bytes", have, meta.size);
      }
      return resp;
    }
    return resp;
  };
  // The CDN's signed URLs expire: a 401/403/410 from a redirect target (not the resolve URL itself) is
  // answered once by asking the Hub for a fresh URL and going on from the bytes already on disk.
  Response r = with_retries(url, t, attempt);
  const bool expired = r.code == CURLE_OK && (r.status == 401 || r.status == 403 || r.status == 410) &&
                       url != resolve_url(endpoint_, t.repo_id, t.revision, t.path);
  if (expired && write_errno == 0) {
    const FileMeta fresh = *file_meta(t, false);
    if (fresh.etag != meta.etag)
      fail(kCtx, "{}/{} changed on the Hub during the download (etag {} -> {}); run again", t.repo_id, t.path,
           meta.etag, fresh.etag);
    url = fresh.url;
    r = with_retries(url, t, attempt);
  }
  if (write_errno != 0) {
    if (write_errno == ENOSPC || write_errno == EDQUOT)
      fail(kCtx, "disk full while writing {} ({} written; the partial file is kept and the next run resumes it)",
           partial_path, format_bytes(double(have)));
    fail(kCtx, "{}: write failed ({})", partial_path, std::strerror(write_errno));
  }
  const bool complete_on_disk = meta.size >= 0 && have == meta.size && r.status == 0 && r.code == CURLE_OK;
  if (!complete_on_disk && (r.code != CURLE_OK || (r.status != 200 && r.status != 206)))
    fail_for(r.status, r.code, r.error, r.headers, url, t, !token_.empty());
  if (meta.size >= 0 && have != meta.size) {
    ::unlink(partial_path.c_str());
    fail(kCtx, "{}/{}: the server sent {} bytes, the Hub announced {}; the partial download was deleted", t.repo_id,
         t.path, have, meta.size);
  }
  if (check_sha) {
    const std::string got = hasher.hex_digest();
    if (got != meta.etag) {
      ::unlink(partial_path.c_str());
      fail(kCtx, "{}/{}: checksum mismatch: expected sha256 {}, got {}; the partial download was deleted, run again "
           "to retry", t.repo_id, t.path, meta.etag, got);
    }
  }
  if (::fsync(fd) != 0) fail(kCtx, "{}: fsync failed ({})", partial_path, std::strerror(errno));
  progress.finish(have);
}

}  // namespace qt::hub
