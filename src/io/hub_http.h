// HTTP side of the Hub cache (see hub.h): metadata by HEAD, resumable checksummed downloads by GET,
// retries with backoff for transient failures, one-line errors for 401/403/404 and network failures.
// One libcurl easy handle per client, so consecutive requests reuse the connection.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "io/hub.h"

namespace qt::hub {

// What a request is about, for error messages.
struct FileTarget {
  std::string repo_id, revision, path;
};

struct FileMeta {
  std::string commit;  // X-Repo-Commit
  std::string etag;    // X-Linked-Etag (LFS: the sha256) or ETag, quotes and W/ stripped
  int64_t size = -1;   // X-Linked-Size or Content-Length; -1 when the server sent neither
  std::string url;     // where to GET the bytes: the redirect target for LFS files, else the resolve URL
};

// Percent-encodes everything but unreserved characters (and '/' when keep_slash).
std::string url_encode(const std::string& s, bool keep_slash);
// {endpoint}/{repo_id}/resolve/{revision}/{path}, revision and path percent-encoded.
std::string resolve_url(const std::string& endpoint, const std::string& repo_id, const std::string& revision,
                        const std::string& path);
// True for a 64-hex etag, which the Hub uses for LFS files: the sha256 of the content.
bool is_sha256_etag(const std::string& etag);
std::string effective_endpoint(const HubOptions& opts);  // no trailing '/'
std::string effective_token(const HubOptions& opts);     // "" when none

class HubClient {
 public:
  explicit HubClient(const HubOptions& opts);
  ~HubClient();
  HubClient(const HubClient&) = delete;
  HubClient& operator=(const HubClient&) = delete;

  const std::string& endpoint() const { return endpoint_; }
  int requests() const { return requests_; }

  // HEAD of the file, following only relative redirects (renamed repos). nullopt when missing_ok and
  // the Hub says the repo has no such file (404 EntryNotFound); any other failure is a qt::Error.
  std::optional<FileMeta> file_meta(const FileTarget& t, bool missing_ok);
  // A small GET into memory (the API's file listing).
  std::string get_text(const std::string& url, const FileTarget& t);
  // GETs meta.url into partial_path, resuming what is already there with Range, retrying transient
  // failures from where they stopped; checks the size and, for a sha256 etag, the checksum (a
  // mismatch deletes partial_path and throws). t names the file in progress lines and errors.
  void download(const FileMeta& meta, const FileTarget& t, const std::string& partial_path);

 private:
  struct Response;
  struct Request;
  Response perform(const Request& req);
  template <typename Attempt>
  Response with_retries(const std::string& url, const FileTarget& t, Attempt&& attempt);

  HubOptions opts_;
  std::string endpoint_, token_;
  void* curl_ = nullptr;  // CURL*
  int requests_ = 0;
};

}  // namespace qt::hub
