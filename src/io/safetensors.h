// safetensors files: an 8-byte little-endian header length n, n bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data buffer; offsets are relative to the buffer's start.
// The reader memory-maps the file and validates everything before handing out a tensor:
// header length within the file, JSON syntax, known dtype, non-negative shape,
// dtype size x numel == end - begin, offsets within the buffer and not overlapping.
// Every violation throws qt::Error "[safetensors] <file>: <what>".
// Also accepted: holes between tensors and bytes after the last one (the reference reader refuses
// them; they are harmless). Views are read-only memory; a tensor whose bytes are not aligned to its
// element size (possible with files from other writers) is copied into an aligned buffer instead.
// release(name) drops a tensor's mapped pages from the process once a streaming reader is done with
// it, so reading a whole checkpoint does not leave it all resident.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace qt {

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  size_t begin = 0, end = 0;  // byte offsets into the data buffer
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // mmap + validate
  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;  // throws naming the tensor
  // A CPU tensor viewing the mapped bytes (dtype as on disk); keeps the mapping alive.
  Tensor view(const std::string& name) const;
  // Tells the kernel the tensor's mapped pages are not needed now (madvise MADV_DONTNEED): they leave
  // this process's resident memory (the page cache keeps them; a later read maps them again).
  void release(const std::string& name) const;

 private:
  std::string path_;
  std::shared_ptr<void> mapping_;
  size_t mapping_size_ = 0;
  const uint8_t* buffer_ = nullptr;  // start of the data buffer
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint directory: model.safetensors, or model.safetensors.index.json + shards (the index's
// weight_map names each tensor's shard; every shard is validated). Also accepts a path to a
// single .safetensors file.
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::string& dir_or_file);
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;
  Tensor view(const std::string& name) const;
  void release(const std::string& name) const;  // SafetensorsFile::release

 private:
  std::string origin_;  // the path given, for error messages
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> owner_;
  const SafetensorsFile& file_of(const std::string& name) const;  // throws naming the tensor
};

// Writes tensors (any dtype, CPU) atomically: path.tmp.<pid> is written and fsync'ed, then renamed
// over path. Names must be unique; metadata goes to "__metadata__".
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

namespace detail {
// The validated layout of a whole safetensors file held in memory (bytes [0, size)): the parser
// behind SafetensorsFile, exposed for the fuzzer. Entry offsets are relative to the data buffer,
// which starts at data_start = 8 + header length. Throws like SafetensorsFile.
struct SafetensorsLayout {
  size_t data_start = 0;
  std::vector<SafetensorsEntry> entries;  // in header order
  std::map<std::string, std::string> metadata;
};
SafetensorsLayout parse_safetensors(const uint8_t* bytes, size_t size, const std::string& origin);
}  // namespace detail

}  // namespace qt
