// SHA-256 (FIPS 180-4): fingerprints of chat templates, dataset files and cache contents, and the
// checksum of files downloaded from the Hugging Face Hub.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace qt {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  void update(std::string_view s) { update(s.data(), s.size()); }
  std::array<uint8_t, 32> digest();  // finishes; the object must not be updated afterwards
  std::string hex_digest();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

std::string sha256_hex(std::string_view data);
// Streams a file; throws "[sha256] <path>: cannot read" when it cannot be opened.
std::string sha256_file_hex(const std::string& path);

}  // namespace qt
