// safetensors reader (mmap + validation) and atomic writer.
// File layout: [u64 LE n][n bytes of JSON header][data buffer]. The header maps each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]} with offsets relative to the data buffer, plus an
// optional "__metadata__" string->string map. Every number read from the header is checked before
// it is used (header length against the file, shape products against overflow, byte ranges against
// the buffer and against each other), so a hostile file yields qt::Error, never an out-of-bounds read.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace qt {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // same cap as the reference implementation
constexpr int kMaxJsonDepth = 16;                   // real headers nest 3 deep
constexpr const char* kMetadataKey = "__metadata__";

std::string errno_str() { return std::strerror(errno); }

// Closes a file descriptor on scope exit.
struct FdGuard {
  int fd = -1;
  explicit FdGuard(int f) : fd(f) {}
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

struct JsonTooDeep {};

// Parses the header JSON, refusing deep nesting (memory blow-up) and duplicate top-level keys
// (nlohmann would silently keep the last one). key_order receives the top-level keys in file order
// (nlohmann::json sorts them; ordered_json would make parsing quadratic in the number of keys).
nlohmann::json parse_header_json(const char* begin, const char* end, const std::string& origin,
                                 std::vector<std::string>* key_order) {
  std::set<std::string> seen;
  std::string duplicate;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& value) {
    using E = nlohmann::json::parse_event_t;
    if ((event == E::object_start || event == E::array_start) && depth > kMaxJsonDepth) throw JsonTooDeep{};
    if (event == E::key && depth == 1 && value.is_string()) {
      if (seen.insert(value.get<std::string>()).second)
        key_order->push_back(value.get<std::string>());
      else if (duplicate.empty())
        duplicate = value.get<std::string>();
    }
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(begin, end, callback);
  } catch (const JsonTooDeep&) {
    fail("safetensors", "{}: header JSON is nested more than {} levels deep", origin, kMaxJsonDepth);
  } catch (const nlohmann::json::exception& e) {
    fail("safetensors", "{}: header is not valid JSON: {}", origin, e.what());
  }
  if (!header.is_object()) fail("safetensors", "{}: header JSON is not an object", origin);
  if (!duplicate.empty()) fail("safetensors", "{}: duplicate key '{}' in the header", origin, duplicate);
  return header;
}

// A JSON value for an error message, cut short.
std::string brief(const nlohmann::json& v) {
  std::string s = v.dump();
  return s.size() <= 64 ? s : s.substr(0, 60) + " ...";
}

bool as_u64(const nlohmann::json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<int64_t>() >= 0) {
    *out = uint64_t(v.get<int64_t>());
    return true;
  }
  return false;
}

std::map<std::string, std::string> parse_metadata(const nlohmann::json& m, const std::string& origin) {
  if (!m.is_object()) fail("safetensors", "{}: __metadata__ must be an object of strings, got {}", origin, m.type_name());
  std::map<std::string, std::string> out;
  for (auto it = m.begin(); it != m.end(); ++it) {
    if (!it.value().is_string())
      fail("safetensors", "{}: __metadata__ value of '{}' is not a string (got {})", origin, it.key(),
           it.value().type_name());
    out[it.key()] = it.value().get<std::string>();
  }
  return out;
}

// Validates one header entry against a data buffer of buffer_bytes bytes.
SafetensorsEntry parse_entry(const std::string& name, const nlohmann::json& e, uint64_t buffer_bytes,
                             const std::string& origin) {
  if (!e.is_object()) fail("safetensors", "{}: tensor '{}': entry is not an object", origin, name);
  for (const char* field : {"dtype", "shape", "data_offsets"})
    if (!e.contains(field)) fail("safetensors", "{}: tensor '{}': missing field '{}'", origin, name, field);
  for (auto it = e.begin(); it != e.end(); ++it)
    if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets")
      fail("safetensors", "{}: tensor '{}': unexpected field '{}'", origin, name, it.key());

  SafetensorsEntry out;
  out.name = name;
  const auto& dtype = e.at("dtype");
  if (!dtype.is_string()) fail("safetensors", "{}: tensor '{}': dtype is not a string", origin, name);
  if (!dtype_from_name(dtype.get<std::string>(), &out.dtype))
    fail("safetensors", "{}: tensor '{}': unsupported dtype '{}' (supported: F32 F64 BF16 F16 I64 I32 U8 BOOL)",
         origin, name, dtype.get<std::string>());

  // Shape: every prefix product must fit int64 (shape_numel multiplies in order).
  const auto& shape = e.at("shape");
  if (!shape.is_array()) fail("safetensors", "{}: tensor '{}': shape is not an array", origin, name);
  uint64_t numel = 1;
  for (const auto& d : shape) {
    uint64_t dim = 0;
    if (!as_u64(d, &dim))
      fail("safetensors", "{}: tensor '{}': shape {} must hold non-negative integers", origin, name, brief(shape));
    if (dim > uint64_t(std::numeric_limits<int64_t>::max()) || __builtin_mul_overflow(numel, dim, &numel) ||
        numel > uint64_t(std::numeric_limits<int64_t>::max()))
      fail("safetensors", "{}: tensor '{}': shape {} has too many elements", origin, name, brief(shape));
    out.shape.push_back(int64_t(dim));
  }
  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, uint64_t(dtype_size(out.dtype)), &nbytes))
    fail("safetensors", "{}: tensor '{}': shape {} has too many elements", origin, name, brief(shape));

  const auto& offs = e.at("data_offsets");
  uint64_t begin = 0, end = 0;
  if (!offs.is_array() || offs.size() != 2 || !as_u64(offs[0], &begin) || !as_u64(offs[1], &end))
    fail("safetensors", "{}: tensor '{}': data_offsets {} must be [begin, end] of non-negative integers", origin,
         name, brief(offs));
  if (begin > end) fail("safetensors", "{}: tensor '{}': data_offsets begin {} > end {}", origin, name, begin, end);
  if (end > buffer_bytes)
    fail("safetensors", "{}: tensor '{}': data_offsets end {} is out of bounds of the data buffer ({} bytes)",
         origin, name, end, buffer_bytes);
  if (end - begin != nbytes)
    fail("safetensors", "{}: tensor '{}': shape {} x {} is {} bytes but data_offsets span {} bytes", origin, name,
         shape_str(out.shape), dtype_name(out.dtype), nbytes, end - begin);
  out.begin = size_t(begin);
  out.end = size_t(end);
  return out;
}

void check_no_overlap(const std::vector<SafetensorsEntry>& entries, const std::string& origin) {
  std::vector<const SafetensorsEntry*> byte_ranges;  // empty tensors own no bytes
  for (const auto& e : entries)
    if (e.end > e.begin) byte_ranges.push_back(&e);
  std::sort(byte_ranges.begin(), byte_ranges.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < byte_ranges.size(); ++i)
    if (byte_ranges[i]->begin < byte_ranges[i - 1]->end)
      fail("safetensors", "{}: tensors '{}' [{}, {}) and '{}' [{}, {}) overlap", origin, byte_ranges[i - 1]->name,
           byte_ranges[i - 1]->begin, byte_ranges[i - 1]->end, byte_ranges[i]->name, byte_ranges[i]->begin,
           byte_ranges[i]->end);
}

}  // namespace

namespace detail {

SafetensorsLayout parse_safetensors(const uint8_t* bytes, size_t size, const std::string& origin) {
  if (size < 8) fail("safetensors", "{}: file is {} bytes, too short for the 8-byte header length", origin, size);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | bytes[i];
  if (n > size - 8) fail("safetensors", "{}: header length {} exceeds the file ({} bytes)", origin, n, size);
  if (n > kMaxHeaderBytes)
    fail("safetensors", "{}: header length {} exceeds the limit of {} bytes", origin, n, kMaxHeaderBytes);

  SafetensorsLayout layout;
  layout.data_start = size_t(8 + n);
  const uint64_t buffer_bytes = size - layout.data_start;
  const char* text = reinterpret_cast<const char*>(bytes + 8);
  std::vector<std::string> key_order;
  const nlohmann::json header = parse_header_json(text, text + n, origin, &key_order);
  QT_ASSERT(key_order.size() == header.size(), "header has {} keys, saw {}", header.size(), key_order.size());
  for (const std::string& key : key_order) {
    if (key == kMetadataKey)
      layout.metadata = parse_metadata(header.at(key), origin);
    else
      layout.entries.push_back(parse_entry(key, header.at(key), buffer_bytes, origin));
  }
  check_no_overlap(layout.entries, origin);
  return layout;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  FdGuard fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.fd < 0) fail("safetensors", "{}: cannot open: {}", path, errno_str());
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) fail("safetensors", "{}: cannot stat: {}", path, errno_str());
  if (!S_ISREG(st.st_mode)) fail("safetensors", "{}: not a regular file", path);
  const size_t size = size_t(st.st_size);
  if (size < 8) fail("safetensors", "{}: file is {} bytes, too short for the 8-byte header length", path, size);
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.fd, 0);
  if (addr == MAP_FAILED) fail("safetensors", "{}: cannot mmap {} bytes: {}", path, size, errno_str());
  mapping_ = std::shared_ptr<void>(addr, [size](void* p) { ::munmap(p, size); });
  mapping_size_ = size;

  const auto* bytes = static_cast<const uint8_t*>(addr);
  detail::SafetensorsLayout layout = detail::parse_safetensors(bytes, size, path);
  buffer_ = bytes + layout.data_start;
  entries_ = std::move(layout.entries);
  metadata_ = std::move(layout.metadata);
  for (size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) fail("safetensors", "{}: no tensor named '{}'", path_, name);
  return entries_[it->second];
}

Tensor SafetensorsFile::view(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  const uint8_t* p = buffer_ + e.begin;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(e.dtype) != 0) {
    // Misaligned for its element type: hand out an aligned copy rather than a view.
    Tensor t = Tensor::empty(e.shape, e.dtype);
    if (e.end > e.begin) std::memcpy(t.raw(), p, e.end - e.begin);
    return t;
  }
  return Tensor::view_of(const_cast<uint8_t*>(p), e.shape, e.dtype, mapping_);
}

void SafetensorsFile::release(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  if (e.end == e.begin) return;
  // The whole pages touching the tensor: a neighbour's page dropped too is only mapped again when read.
  const auto page = uintptr_t(::sysconf(_SC_PAGESIZE));
  const auto base = reinterpret_cast<uintptr_t>(mapping_.get());
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(buffer_) + e.begin) / page * page;
  const uintptr_t hi = std::min(base + mapping_size_, reinterpret_cast<uintptr_t>(buffer_) + e.end);
  ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advice: a failure changes nothing
}

// ---------------------------------------------------------------------------------------------
// SafetensorsCheckpoint

namespace {

std::string read_small_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("safetensors", "{}: cannot open {}", path, what);
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0 || uint64_t(size) > kMaxHeaderBytes)
    fail("safetensors", "{}: {} is missing or larger than {} bytes", path, what, kMaxHeaderBytes);
  in.seekg(0);
  std::string text(size_t(size), '\0');
  if (!in.read(text.data(), size)) fail("safetensors", "{}: cannot read {}", path, what);
  return text;
}

bool is_safe_shard_name(const std::string& s) {
  return !s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
         s.find('\\') == std::string::npos && s.find('\0') == std::string::npos;
}

}  // namespace

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& dir_or_file) : origin_(dir_or_file) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path root(dir_or_file);
  if (!fs::exists(root, ec)) fail("safetensors", "{}: no such file or directory", dir_or_file);
  const fs::path single = root / "model.safetensors", index = root / "model.safetensors.index.json";
  if (!fs::is_directory(root, ec) || fs::exists(single, ec)) {
    files_.push_back(std::make_unique<SafetensorsFile>(fs::is_directory(root, ec) ? single.string() : dir_or_file));
    for (const auto& e : files_[0]->entries()) owner_[e.name] = files_[0].get();
    return;
  }
  if (!fs::exists(index, ec))
    fail("safetensors", "{}: neither model.safetensors nor model.safetensors.index.json is in this directory",
         dir_or_file);

  // Sharded: validate the index, open each shard once, and check both directions of the mapping.
  const std::string index_path = index.string();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_small_file(index_path, "the index"));
  } catch (const nlohmann::json::exception& e) {
    fail("safetensors", "{}: not valid JSON: {}", index_path, e.what());
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    fail("safetensors", "{}: expected an object with a \"weight_map\" object", index_path);
  std::map<std::string, std::string> shard_of;  // tensor -> shard file name
  std::map<std::string, const SafetensorsFile*> shards;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      fail("safetensors", "{}: weight_map value for '{}' is not a string", index_path, it.key());
    const std::string shard = it.value().get<std::string>();
    if (!is_safe_shard_name(shard))
      fail("safetensors", "{}: shard name '{}' for '{}' must be a plain file name in the same directory",
           index_path, shard, it.key());
    shard_of[it.key()] = shard;
    shards[shard] = nullptr;
  }
  for (auto& [shard, file] : shards) {
    const fs::path p = root / shard;
    if (!fs::exists(p, ec)) fail("safetensors", "{}: shard '{}' listed in the index does not exist", index_path, shard);
    files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
    file = files_.back().get();
  }
  for (const auto& [name, shard] : shard_of) {
    if (!shards[shard]->contains(name))
      fail("safetensors", "{}: tensor '{}' is assigned to shard '{}' by the index but is not in it", index_path,
           name, shard);
    owner_[name] = shards[shard];
  }
  for (const auto& [shard, file] : shards) {
    for (const auto& e : file->entries()) {
      auto it = shard_of.find(e.name);
      if (it == shard_of.end())
        fail("safetensors", "{}: tensor '{}' in shard '{}' is not listed in the index", index_path, e.name, shard);
      if (it->second != shard)  // the assigned shard holds it too (checked above)
        fail("safetensors", "{}: tensor '{}' is in shards '{}' and '{}' (duplicate name across shards)", index_path,
             e.name, it->second, shard);
    }
  }
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : owner_) out.push_back(name);
  return out;
}

bool SafetensorsCheckpoint::contains(const std::string& name) const { return owner_.count(name) != 0; }

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  auto it = owner_.find(name);
  if (it == owner_.end()) fail("safetensors", "{}: no tensor named '{}'", origin_, name);
  return *it->second;
}

const SafetensorsEntry& SafetensorsCheckpoint::entry(const std::string& name) const { return file_of(name).entry(name); }

Tensor SafetensorsCheckpoint::view(const std::string& name) const { return file_of(name).view(name); }

void SafetensorsCheckpoint::release(const std::string& name) const { file_of(name).release(name); }

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

// The temporary file of an atomic write: once created, removed on scope exit unless committed.
struct TempFile {
  std::string path;
  int fd = -1;
  bool created = false, committed = false;
  explicit TempFile(std::string p) : path(std::move(p)) {}
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (created && !committed) ::unlink(path.c_str());
  }
};

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t(1) << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      fail("safetensors", "{}: write failed: {}", path, errno_str());
    }
    p += w;
    n -= size_t(w);
  }
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Validate everything before touching the file system.
  std::set<std::string> names;
  for (const auto& [name, t] : tensors) {
    if (name.empty()) fail("safetensors", "{}: tensor name is empty", path);
    if (name == kMetadataKey) fail("safetensors", "{}: tensor name '{}' is reserved", path, name);
    if (!names.insert(name).second) fail("safetensors", "{}: duplicate tensor name '{}'", path, name);
    if (!t.defined()) fail("safetensors", "{}: tensor '{}' is undefined", path, name);
    if (t.device() != Device::CPU)
      fail("safetensors", "{}: tensor '{}' is on {}, only CPU tensors can be written", path, name,
           device_name(t.device()));
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  size_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", dtype_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    fail("safetensors", "{}: cannot encode the header (names and metadata must be UTF-8): {}", path, e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer starts 8-byte aligned
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  TempFile tmp(fmt::format("{}.tmp.{}", path, ::getpid()));
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (tmp.fd < 0) fail("safetensors", "{}: cannot create: {}", tmp.path, errno_str());
  tmp.created = true;
  write_all(tmp.fd, length, 8, tmp.path);
  write_all(tmp.fd, text.data(), text.size(), tmp.path);
  for (const auto& [name, t] : tensors) write_all(tmp.fd, t.raw(), t.nbytes(), tmp.path);
  if (::fsync(tmp.fd) != 0) fail("safetensors", "{}: fsync failed: {}", tmp.path, errno_str());
  const int fd = tmp.fd;
  tmp.fd = -1;
  if (::close(fd) != 0) fail("safetensors", "{}: close failed: {}", tmp.path, errno_str());
  if (::rename(tmp.path.c_str(), path.c_str()) != 0)
    fail("safetensors", "{}: cannot rename {} over it: {}", path, tmp.path, errno_str());
  tmp.committed = true;
  // Make the rename itself durable.
  const std::string dir = std::filesystem::path(path).parent_path().string();
  FdGuard dir_fd(::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir_fd.fd >= 0) ::fsync(dir_fd.fd);
}

}  // namespace qt
