// qwentune merge / convert-lora: see io/merge.h for the math and the output format.
//
// Merge runs in two passes over the checkpoint's header only, then one streaming pass over the data:
//  1. plan: every checkpoint tensor becomes an output tensor (same name and shape); the adapted
//     projections among them get "delta segments", row ranges [row0, row0+rows) of the tensor
//     viewed as a (rows, cols) matrix that receive scale * B A of one (layer, slot, expert) adapter.
//     Every adapter matrix must land on exactly one segment, every segment on a tensor of the
//     shape the config implies.
//  2. layout: tensors in natural name order (layer 2 before layer 10), greedily cut into shards.
//  3. write: each shard's header first, then every tensor in row chunks of ~4M elements:
//     source -> f64 (+ dgemm of the delta) -> f32 -> output dtype -> file.
#include "io/merge.h"

#include <cblas.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/lora.h"
#include "model/nf4.h"

namespace qt {

namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

constexpr int64_t kChunkElems = int64_t(1) << 22;  // rows per chunk ~ 4M elements / cols

// Files next to the weights that belong to a usable model directory.
constexpr const char* kModelSideFiles[] = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                                           "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                                           "chat_template.jinja"};

bool is_float(DType t) { return t == DType::F32 || t == DType::F64 || t == DType::BF16 || t == DType::F16; }

std::string errno_str() { return std::strerror(errno); }

// "model.layers.10.x" after "model.layers.2.x": digit runs compare as numbers.
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) && std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t i2 = i, j2 = j;
      while (i2 < a.size() && a[i2] == '0') ++i2;
      while (j2 < b.size() && b[j2] == '0') ++j2;
      size_t ie = i2, je = j2;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      if (ie - i2 != je - j2) return ie - i2 < je - j2;
      const int c = a.compare(i2, ie - i2, b, j2, je - j2);
      if (c != 0) return c < 0;
      if (ie - i != je - j) return ie - i < je - j;  // "01" vs "1": fewer leading zeros first
      i = ie, j = je;
      continue;
    }
    if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
    ++i, ++j;
  }
  return a.size() - i < b.size() - j;
}

std::string read_text(const fs::path& p, const char* ctx) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail(ctx, "{}: cannot open", p.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail(ctx, "{}: read error", p.string());
  return ss.str();
}

void write_all(int fd, const void* data, size_t n, const std::string& path, const char* ctx) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail(ctx, "{}: write failed: {}", path, errno_str());
    p += w;
    n -= size_t(w);
  }
}

void write_text_file(const fs::path& p, const std::string& text, const char* ctx) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  if (!out) fail(ctx, "{}: cannot create", p.string());
  out << text;
  out.close();
  if (!out) fail(ctx, "{}: write failed", p.string());
}

void fsync_path(const fs::path& p, int flags) {
  const int fd = ::open(p.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

// A temporary sibling directory of `out` that becomes `out` on commit() and is removed otherwise.
class StagingDir {
 public:
  StagingDir(const std::string& out, bool force, const std::vector<std::string>& inputs, const char* ctx)
      : out_(fs::absolute(fs::path(out)).lexically_normal()), ctx_(ctx) {
    if (out.empty()) fail(ctx, "--out is empty");
    if (out_.filename().empty()) out_ = out_.parent_path();  // "dir/" -> "dir"
    std::error_code ec;
    for (const std::string& in : inputs) {  // replacing --out must never delete an input
      if (!fs::exists(in, ec) || !fs::exists(out_, ec)) continue;
      const fs::path rel = fs::weakly_canonical(in, ec).lexically_relative(fs::weakly_canonical(out_, ec));
      if (fs::equivalent(in, out_, ec) || (!rel.empty() && *rel.begin() != ".."))
        fail(ctx, "{}: the output directory is, or contains, the input {}", out, in);
    }
    const fs::file_status st = fs::symlink_status(out_, ec);
    if (fs::exists(st)) {
      const bool empty_dir = fs::is_directory(st) && fs::is_empty(out_, ec);
      if (!empty_dir && !force)
        fail(ctx, "{}: already exists and is not an empty directory (pass --force to replace it)", out);
    }
    const fs::path parent = out_.parent_path();
    fs::create_directories(parent, ec);
    if (!fs::is_directory(parent, ec)) fail(ctx, "{}: cannot create the parent directory {}", out, parent.string());
    tmp_ = parent / fmt::format(".{}.tmp.{}", out_.filename().string(), ::getpid());
    fs::remove_all(tmp_, ec);
    if (!fs::create_directory(tmp_, ec) || ec) fail(ctx, "{}: cannot create: {}", tmp_.string(), ec.message());
  }
  StagingDir(const StagingDir&) = delete;
  StagingDir& operator=(const StagingDir&) = delete;
  ~StagingDir() {
    if (committed_) return;
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
  const fs::path& path() const { return tmp_; }

  // Renames the staging directory to `out`, replacing what is there (checked in the constructor).
  void commit() {
    fsync_path(tmp_, O_RDONLY | O_DIRECTORY);
    std::error_code ec;
    const fs::file_status st = fs::symlink_status(out_, ec);
    fs::path old;
    if (fs::exists(st) && !(fs::is_directory(st) && fs::is_empty(out_, ec))) {
      old = out_.parent_path() / fmt::format(".{}.old.{}", out_.filename().string(), ::getpid());
      fs::remove_all(old, ec);
      if (::rename(out_.c_str(), old.c_str()) != 0) fail(ctx_, "{}: cannot move it aside: {}", out_.string(), errno_str());
    } else if (fs::exists(st)) {
      fs::remove(out_, ec);  // an empty directory
    }
    if (::rename(tmp_.c_str(), out_.c_str()) != 0) {
      const std::string err = errno_str();
      if (!old.empty()) (void)::rename(old.c_str(), out_.c_str());
      fail(ctx_, "{}: cannot rename {} to it: {}", out_.string(), tmp_.string(), err);
    }
    committed_ = true;
    if (!old.empty()) fs::remove_all(old, ec);
    fsync_path(out_.parent_path(), O_RDONLY | O_DIRECTORY);
  }

 private:
  fs::path out_, tmp_;
  const char* ctx_;
  bool committed_ = false;
};

// ---- merge plan -------------------------------------------------------------------------------

// Rows [row0, row0 + rows) of a tensor viewed as (numel / cols, cols) get scale * B A of the adapter
// of (layer, slot), expert `expert` (-1: a dense adapter).
struct DeltaSegment {
  int64_t row0 = 0, rows = 0;
  int64_t layer = 0;
  LoraSlot slot = kLoraQ;
  int64_t expert = -1;
};

struct PlannedTensor {
  std::string name;
  DType src_dtype = DType::F32, out_dtype = DType::F32;
  Shape shape;
  bool nf4 = false;                  // a bitsandbytes 4-bit weight (src_dtype, shape: the dequantized one)
  std::vector<DeltaSegment> deltas;  // sorted by row0, disjoint
  uint64_t out_bytes() const { return uint64_t(shape_numel(shape)) * dtype_size(out_dtype); }
};

// "model.layers.<L>.<rest>" -> (L, rest); false for other names.
bool split_layer_name(const std::string& name, int64_t* layer, std::string* rest) {
  static const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t i = prefix.size(), j = i;
  while (j < name.size() && std::isdigit(static_cast<unsigned char>(name[j])) && j - i < 9) ++j;
  if (j == i || j >= name.size() || name[j] != '.') return false;
  *layer = std::stoll(name.substr(i, j - i));
  *rest = name.substr(j + 1);
  return true;
}

class MergePlanner {
 public:
  MergePlanner(const ModelConfig& mcfg, const LoraAdapter& lora, const SafetensorsCheckpoint& ckpt, DType out_dtype)
      : c_(mcfg), lora_(lora), ckpt_(ckpt), out_dtype_(out_dtype) {}

  std::vector<PlannedTensor> plan() {
    std::vector<PlannedTensor> out;
    std::set<std::string> companions;  // of 4-bit weights: absmax, quant_map, ... (not written)
    for (const std::string& name : ckpt_.names())
      if (is_bnb_4bit_weight(ckpt_, name))
        for (const std::string& c : bnb_4bit_companions(ckpt_, name)) companions.insert(c);
    for (const std::string& name : ckpt_.names()) {
      if (companions.count(name)) continue;
      const SafetensorsEntry& e = ckpt_.entry(name);
      PlannedTensor t;
      t.name = name;
      t.src_dtype = e.dtype;
      t.shape = e.shape;
      if (is_bnb_4bit_weight(ckpt_, name)) {  // dequantized when written
        const Nf4Tensor q = nf4_from_bnb(ckpt_, name);
        t.nf4 = true;
        t.src_dtype = q.dtype;
        t.shape = q.shape;
      }
      t.out_dtype = is_float(t.src_dtype) ? out_dtype_ : t.src_dtype;
      add_deltas(t);
      std::sort(t.deltas.begin(), t.deltas.end(),
                [](const DeltaSegment& a, const DeltaSegment& b) { return a.row0 < b.row0; });
      out.push_back(std::move(t));
    }
    check_coverage();
    std::sort(out.begin(), out.end(), [](const PlannedTensor& a, const PlannedTensor& b) { return natural_less(a.name, b.name); });
    return out;
  }

 private:
  bool targeted(int64_t l, LoraSlot s) const { return lora_.layers[size_t(l)].slot[size_t(s)].present(); }

  void expect_shape(const PlannedTensor& t, const Shape& want) const {
    if (t.shape != want)
      fail("merge", "{}: shape {} in the checkpoint, expected {} for this config.json and the adapter", t.name,
           shape_str(t.shape), shape_str(want));
    if (!is_float(t.src_dtype))
      fail("merge", "{}: dtype {} cannot take a LoRA delta (quantized checkpoints cannot be merged; merge into the "
           "unquantized model)", t.name, dtype_name(t.src_dtype));
  }

  void add(PlannedTensor& t, int64_t row0, int64_t rows, int64_t l, LoraSlot s, int64_t expert) {
    const auto key = std::make_tuple(l, int(s), expert);
    auto [it, fresh] = covered_.emplace(key, t.name);
    if (!fresh)
      fail("merge", "{} and {} both hold layer {} {}{}: the checkpoint mixes expert layouts", it->second, t.name, l,
           lora_slot_module(s), expert >= 0 ? fmt::format(" of expert {}", expert) : "");
    t.deltas.push_back({row0, rows, l, s, expert});
  }

  void add_deltas(PlannedTensor& t) {
    int64_t l = 0;
    std::string rest;
    if (!split_layer_name(t.name, &l, &rest)) return;
    if (l >= c_.num_hidden_layers)
      fail("merge", "{}: layer {} but config.json has num_hidden_layers {}", t.name, l, c_.num_hidden_layers);
    const bool moe = c_.is_moe_layer(l);
    for (int si = 0; si < kNumLoraSlots; ++si) {
      const LoraSlot s = LoraSlot(si);
      const std::string mod = lora_slot_module(s);
      const LoraSlotShape sh = lora_slot_shape(c_, l, s);
      const std::string dense_name = std::string(s <= kLoraO ? "self_attn." : "mlp.") + mod + ".weight";
      if (rest == dense_name) {
        if (!targeted(l, s)) return;
        if (!moe || s <= kLoraO) {  // a dense projection (out, in)
          expect_shape(t, {sh.out, sh.in});
          add(t, 0, sh.out, l, s, -1);
        } else {  // transformers-qwen3-moe-fused: (E, out, in)
          expect_shape(t, {sh.experts, sh.out, sh.in});
          for (int64_t e = 0; e < sh.experts; ++e) add(t, e * sh.out, sh.out, l, s, e);
        }
        return;
      }
    }
    if (!moe) return;
    const LoraSlotShape g = lora_slot_shape(c_, l, kLoraGate), d = lora_slot_shape(c_, l, kLoraDown);
    const int64_t E = g.experts, I = g.out;
    if (rest == "mlp.experts.gate_up_proj") {  // transformers v5: (E, 2I, H), gate rows first
      if (!targeted(l, kLoraGate) && !targeted(l, kLoraUp)) return;
      expect_shape(t, {E, 2 * I, g.in});
      for (int64_t e = 0; e < E; ++e) {
        if (targeted(l, kLoraGate)) add(t, e * 2 * I, I, l, kLoraGate, e);
        if (targeted(l, kLoraUp)) add(t, e * 2 * I + I, I, l, kLoraUp, e);
      }
      return;
    }
    if (rest == "mlp.experts.down_proj") {  // transformers v5: (E, H, I)
      if (!targeted(l, kLoraDown)) return;
      expect_shape(t, {E, d.out, d.in});
      for (int64_t e = 0; e < E; ++e) add(t, e * d.out, d.out, l, kLoraDown, e);
      return;
    }
    // Hub per-expert: mlp.experts.<e>.<proj>.weight (out, in)
    static const std::string ex = "mlp.experts.";
    if (rest.compare(0, ex.size(), ex) != 0) return;
    size_t i = ex.size(), j = i;
    while (j < rest.size() && std::isdigit(static_cast<unsigned char>(rest[j])) && j - i < 9) ++j;
    if (j == i || j >= rest.size() || rest[j] != '.') return;
    const int64_t e = std::stoll(rest.substr(i, j - i));
    const std::string proj = rest.substr(j + 1);
    for (LoraSlot s : {kLoraGate, kLoraUp, kLoraDown}) {
      if (proj != std::string(lora_slot_module(s)) + ".weight") continue;
      if (e >= E) fail("merge", "{}: expert {} but config.json has {} experts", t.name, e, E);
      if (!targeted(l, s)) return;
      const LoraSlotShape sh = lora_slot_shape(c_, l, s);
      expect_shape(t, {sh.out, sh.in});
      add(t, 0, sh.out, l, s, e);
      return;
    }
  }

  // Every adapter matrix must have found its checkpoint tensor.
  void check_coverage() const {
    for (int64_t l = 0; l < c_.num_hidden_layers; ++l)
      for (int si = 0; si < kNumLoraSlots; ++si) {
        const LoraSlot s = LoraSlot(si);
        if (!targeted(l, s)) continue;
        const LoraSlotShape sh = lora_slot_shape(c_, l, s);
        for (int64_t e = sh.experts ? 0 : -1; e < (sh.experts ? sh.experts : 0); ++e)
          if (!covered_.count(std::make_tuple(l, si, e)))
            fail("merge", "the checkpoint has no weight for layer {} {}{} (e.g. model.layers.{}.{}) that the adapter "
                 "adapts", l, lora_slot_module(s), e >= 0 ? fmt::format(" of expert {}", e) : "", l,
                 sh.experts ? fmt::format("mlp.experts.{}.{}.weight", e, lora_slot_module(s))
                            : fmt::format("{}.{}.weight", s <= kLoraO ? "self_attn" : "mlp", lora_slot_module(s)));
      }
  }

  const ModelConfig& c_;
  const LoraAdapter& lora_;
  const SafetensorsCheckpoint& ckpt_;
  DType out_dtype_;
  std::map<std::tuple<int64_t, int, int64_t>, std::string> covered_;
};

// ---- streaming writer ------------------------------------------------------------------------

// One safetensors file written front to back: the header is known up front, the data arrives in
// pieces, and finish() checks that exactly the announced bytes came.
class SafetensorsStreamWriter {
 public:
  SafetensorsStreamWriter(const fs::path& path, const std::vector<const PlannedTensor*>& tensors) : path_(path.string()) {
    ojson header = ojson::object();
    header["__metadata__"] = {{"format", "pt"}};
    for (const PlannedTensor* t : tensors) {
      header[t->name] = {{"dtype", dtype_name(t->out_dtype)}, {"shape", t->shape},
                         {"data_offsets", {expected_, expected_ + t->out_bytes()}}};
      expected_ += t->out_bytes();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(text.size()) >> (8 * i));
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail("merge", "{}: cannot create: {}", path_, errno_str());
    write_all(fd_, length, 8, path_, "merge");
    write_all(fd_, text.data(), text.size(), path_, "merge");
  }
  SafetensorsStreamWriter(const SafetensorsStreamWriter&) = delete;
  SafetensorsStreamWriter& operator=(const SafetensorsStreamWriter&) = delete;
  ~SafetensorsStreamWriter() {
    if (fd_ >= 0) ::close(fd_);
  }
  void write(const void* data, size_t n) {
    write_all(fd_, data, n, path_, "merge");
    written_ += n;
  }
  void finish() {
    QT_ASSERT(written_ == expected_, "{}: wrote {} data bytes, announced {}", path_, written_, expected_);
    if (::fsync(fd_) != 0) fail("merge", "{}: fsync failed: {}", path_, errno_str());
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail("merge", "{}: close failed: {}", path_, errno_str());
  }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t expected_ = 0, written_ = 0;
};

// n elements src (st) -> dst (dt), split over threads.
void convert_parallel(void* dst, DType dt, const void* src, DType st, int64_t n) {
  constexpr int64_t kBlock = int64_t(1) << 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t off = b * kBlock, cnt = std::min(kBlock, n - off);
    convert_elements(static_cast<char*>(dst) + size_t(off) * dtype_size(dt), dt,
                     static_cast<const char*>(src) + size_t(off) * dtype_size(st), st, size_t(cnt));
  }
}

// The (rows, cols) matrices B (out, r) and A (r, in) of one adapter (expert e, or the dense one), in f64.
struct DeltaFactors {
  std::vector<double> A, B;
  int64_t r = 0;
};

DeltaFactors delta_factors(const LoraAdapter& lora, const DeltaSegment& d) {
  const LoraPair& p = lora.layers[size_t(d.layer)].slot[size_t(d.slot)];
  Tensor A = d.expert >= 0 ? p.A.slice_rows(d.expert, d.expert + 1) : p.A;
  Tensor B = d.expert >= 0 ? p.B.slice_rows(d.expert, d.expert + 1) : p.B;
  DeltaFactors f;
  f.r = p.A.dim(-2);
  f.A.resize(size_t(A.numel()));
  f.B.resize(size_t(B.numel()));
  convert_elements(f.A.data(), DType::F64, A.raw(), A.dtype(), f.A.size());
  convert_elements(f.B.data(), DType::F64, B.raw(), B.dtype(), f.B.size());
  return f;
}

// Streams one tensor: row chunks, each plain (converted via f32) or with the delta of one segment.
void write_tensor(const PlannedTensor& t, const SafetensorsCheckpoint& ckpt, const LoraAdapter& lora, double scale,
                  SafetensorsStreamWriter& w) {
  const Tensor src = t.nf4 ? nf4_dequantize(nf4_from_bnb(ckpt, t.name), t.src_dtype) : ckpt.view(t.name);
  const int64_t numel = shape_numel(t.shape);
  if (numel == 0) return;
  const char* src_bytes = static_cast<const char*>(src.raw());
  if (!is_float(t.src_dtype)) {
    w.write(src_bytes, src.nbytes());
    return;
  }
  const int64_t cols = t.shape.empty() ? 1 : t.shape.back(), rows = numel / cols;
  const size_t ssz = dtype_size(t.src_dtype), osz = dtype_size(t.out_dtype);
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkElems / cols);
  std::vector<float> f32(size_t(std::min(rows, chunk_rows) * cols));
  std::vector<double> f64;
  std::vector<char> out(t.out_dtype == DType::F32 ? 0 : f32.size() * osz);

  auto emit = [&](int64_t n_elems) {  // f32 buffer -> output dtype -> file
    if (t.out_dtype == DType::F32) {
      w.write(f32.data(), size_t(n_elems) * 4);
    } else {
      convert_parallel(out.data(), t.out_dtype, f32.data(), DType::F32, n_elems);
      w.write(out.data(), size_t(n_elems) * osz);
    }
  };

  size_t next_delta = 0;
  int64_t row = 0;
  while (row < rows) {
    const DeltaSegment* seg = nullptr;
    int64_t end = rows;
    if (next_delta < t.deltas.size()) {
      const DeltaSegment& d = t.deltas[next_delta];
      if (d.row0 <= row) {
        seg = &d;
        end = d.row0 + d.rows;
      } else {
        end = d.row0;
      }
    }
    if (!seg) {  // plain rows [row, end)
      for (int64_t r0 = row; r0 < end; r0 += chunk_rows) {
        const int64_t n = std::min(chunk_rows, end - r0) * cols;
        convert_parallel(f32.data(), DType::F32, src_bytes + size_t(r0 * cols) * ssz, t.src_dtype, n);
        emit(n);
      }
    } else {  // W' = W + scale * B[rows] A, in f64, rounded to f32
      const DeltaFactors f = delta_factors(lora, *seg);
      QT_ASSERT(int64_t(f.A.size()) == f.r * cols && int64_t(f.B.size()) == f.r * seg->rows,
                "{}: delta factors do not fit rows {} cols {}", t.name, seg->rows, cols);
      f64.resize(f32.size());
      for (int64_t r0 = row; r0 < end; r0 += chunk_rows) {
        const int64_t nr = std::min(chunk_rows, end - r0), n = nr * cols;
        convert_parallel(f64.data(), DType::F64, src_bytes + size_t(r0 * cols) * ssz, t.src_dtype, n);
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nr), int(cols), int(f.r), scale,
                    f.B.data() + (r0 - seg->row0) * f.r, int(f.r), f.A.data(), int(cols), 1.0, f64.data(), int(cols));
        convert_parallel(f32.data(), DType::F32, f64.data(), DType::F64, n);
        emit(n);
      }
      ++next_delta;
    }
    row = end;
  }
}

const char* hf_dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return "float32";
  }
}

// The adapter file's widest float dtype: F64 when any tensor is F64, else F32 (holds F32/BF16/F16 exactly).
DType adapter_load_dtype(const std::string& adapter_dir) {
  const fs::path st = fs::path(adapter_dir) / "adapter_model.safetensors";
  std::error_code ec;
  if (!fs::exists(st, ec)) return DType::F32;  // load_peft_adapter reports it
  SafetensorsFile f(st.string());
  for (const SafetensorsEntry& e : f.entries())
    if (e.dtype == DType::F64) return DType::F64;
  return DType::F32;
}

// Runs fn, turning a qt::Error from another component into "[ctx] <its message>".
template <typename Fn>
auto with_context(const char* ctx, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error& e) {
    const std::string prefix = fmt::format("[{}] ", ctx);
    if (std::string(e.what()).compare(0, prefix.size(), prefix) == 0) throw;
    fail(ctx, "{}", e.what());
  } catch (const fs::filesystem_error& e) {
    fail(ctx, "{}", e.what());
  }
}

void require_dir(const std::string& dir, const char* what, const char* ctx) {
  std::error_code ec;
  if (dir.empty()) fail(ctx, "--{} is empty", what);
  if (!fs::is_directory(dir, ec)) fail(ctx, "{}: the {} directory does not exist", dir, what);
}

MergeSummary merge_impl(const MergeOptions& opt) {
  if (opt.dtype != DType::BF16 && opt.dtype != DType::F16 && opt.dtype != DType::F32)
    fail("merge", "output dtype {} is not supported (bf16, f16 or f32)", dtype_name(opt.dtype));
  if (opt.shard_bytes == 0) fail("merge", "the shard size must be positive");
  require_dir(opt.model_dir, "model", "merge");
  require_dir(opt.adapter_dir, "adapter", "merge");

  StagingDir staging(opt.out_dir, opt.force, {opt.model_dir, opt.adapter_dir}, "merge");  // checks --out first
  const fs::path model_dir(opt.model_dir);
  const std::string cfg_text = read_text(model_dir / "config.json", "merge");
  ojson cfg_json;
  try {
    cfg_json = ojson::parse(cfg_text);
  } catch (const nlohmann::json::exception& e) {
    fail("merge", "{}: invalid JSON: {}", (model_dir / "config.json").string(), e.what());
  }
  if (cfg_json.is_object() && cfg_json.contains("quantization_config") && !cfg_json["quantization_config"].is_null()) {
    // bitsandbytes 4-bit bases are dequantized (bit-exact) and written unquantized; nothing else is read.
    const ojson& qc = cfg_json["quantization_config"];
    const bool bnb4 = qc.is_object() && qc.value("quant_method", "") == "bitsandbytes" && qc.value("load_in_4bit", false);
    if (!bnb4)
      fail("merge", "{}: the model is quantized (quantization_config) in a format other than bitsandbytes 4-bit; "
           "merge into the unquantized model instead", opt.model_dir);
    cfg_json.erase("quantization_config");
  }
  const ModelConfig mcfg = parse_hf_config_json(cfg_text, (model_dir / "config.json").string());
  const LoraAdapter lora = load_peft_adapter(opt.adapter_dir, mcfg, adapter_load_dtype(opt.adapter_dir));
  const SafetensorsCheckpoint ckpt(opt.model_dir);
  MergePlanner planner(mcfg, lora, ckpt, opt.dtype);
  const std::vector<PlannedTensor> plan = planner.plan();

  // Shards: greedy in name order; a tensor larger than the shard size gets a shard of its own.
  std::vector<std::vector<const PlannedTensor*>> shards(1);
  uint64_t shard_size = 0, total = 0;
  for (const PlannedTensor& t : plan) {
    if (!shards.back().empty() && shard_size + t.out_bytes() > opt.shard_bytes) {
      shards.emplace_back();
      shard_size = 0;
    }
    shards.back().push_back(&t);
    shard_size += t.out_bytes();
    total += t.out_bytes();
  }
  if (shards.size() > 99999) fail("merge", "{} shards of at most {} bytes: raise --shard-size", shards.size(), opt.shard_bytes);

  MergeSummary sum;
  const double scale = lora.cfg.scale();
  ojson weight_map = ojson::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shard_file_name(s, shards.size());
    SafetensorsStreamWriter w(staging.path() / file, shards[s]);
    for (const PlannedTensor* t : shards[s]) {
      write_tensor(*t, ckpt, lora, scale, w);
      weight_map[t->name] = file;
      sum.tensors++;
      sum.merged_matrices += int64_t(t->deltas.size());
    }
    w.finish();
  }
  if (shards.size() > 1) {
    write_text_file(staging.path() / "model.safetensors.index.json", shard_index_json(weight_map, total), "merge");
  }

  // config.json: the input's keys in order, with the stored dtype updated.
  bool has_dtype_key = false;
  for (const char* key : {"dtype", "torch_dtype"})
    if (cfg_json.contains(key)) {
      cfg_json[key] = hf_dtype_name(opt.dtype);
      has_dtype_key = true;
    }
  if (!has_dtype_key) cfg_json["torch_dtype"] = hf_dtype_name(opt.dtype);
  write_text_file(staging.path() / "config.json", cfg_json.dump(2) + "\n", "merge");
  copy_model_side_files(opt.model_dir, staging.path().string(), "merge");
  staging.commit();
  sum.shards = int64_t(shards.size());
  sum.total_bytes = total;
  return sum;
}

ConvertLoraSummary convert_impl(const std::string& adapter_dir, const std::string& model_dir, bool fused,
                                const std::string& out_dir, bool force) {
  require_dir(adapter_dir, "adapter", "convert-lora");
  require_dir(model_dir, "model", "convert-lora");
  const ModelConfig mcfg = load_hf_config(model_dir);
  const fs::path st_path = fs::path(adapter_dir) / "adapter_model.safetensors";
  std::error_code ec;
  if (!fs::is_regular_file(st_path, ec)) fail("convert-lora", "{}: missing", st_path.string());

  // Keep the file's dtype: one float dtype throughout -> that one, mixed -> the widest.
  SafetensorsFile file(st_path.string());
  DType dt = file.entries().empty() ? DType::F32 : file.entries()[0].dtype;
  for (const SafetensorsEntry& e : file.entries())
    if (e.dtype != dt) dt = adapter_load_dtype(adapter_dir);
  if (!is_float(dt)) fail("convert-lora", "{}: dtype {} is not a float type", st_path.string(), dtype_name(dt));
  std::map<std::string, std::string> metadata = file.metadata();
  if (!metadata.count("format")) metadata["format"] = "pt";

  const LoraAdapter lora = load_peft_adapter(adapter_dir, mcfg, dt);
  ConvertLoraSummary sum;
  for (int64_t l = 0; l < mcfg.num_hidden_layers; ++l)
    for (int s = 0; s < kNumLoraSlots; ++s)
      if (lora.layers[size_t(l)].slot[size_t(s)].present() && lora_slot_shape(mcfg, l, LoraSlot(s)).experts)
        sum.expert_modules++;
  const auto tensors = lora_named_tensors(lora, mcfg, fused);
  sum.tensors = int64_t(tensors.size());

  StagingDir staging(out_dir, force, {adapter_dir, model_dir}, "convert-lora");
  write_safetensors((staging.path() / "adapter_model.safetensors").string(), tensors, metadata);
  for (const auto& entry : fs::directory_iterator(adapter_dir)) {  // adapter_config.json, README.md, ...
    const std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || name == "adapter_model.safetensors" || name == "adapter_model.bin") continue;
    fs::copy_file(entry.path(), staging.path() / name, fs::copy_options::overwrite_existing);
  }
  staging.commit();
  return sum;
}

}  // namespace

std::string shard_file_name(size_t s, size_t n) {
  return n == 1 ? std::string("model.safetensors") : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n);
}

std::string shard_index_json(const nlohmann::ordered_json& weight_map, uint64_t total_size) {
  const nlohmann::ordered_json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
  return index.dump(2) + "\n";
}

uint64_t parse_byte_size(const std::string& text, const char* ctx) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  const std::string number = text.substr(0, i);
  size_t j = i;
  while (j < text.size() && text[j] == ' ') ++j;
  std::string unit = text.substr(j);
  for (char& ch : unit) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  static const std::map<std::string, double> units = {
      {"", 1}, {"b", 1}, {"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
      {"kib", 1024.0}, {"mib", 1048576.0}, {"gib", 1073741824.0}, {"tib", 1099511627776.0}};
  double value = 0;
  size_t used = 0;
  bool ok = !number.empty() && std::count(number.begin(), number.end(), '.') <= 1 && number != ".";
  if (ok) {
    try {
      value = std::stod(number, &used);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  if (!ok || used != number.size() || !units.count(unit))
    fail(ctx, "'{}' is not a size (examples: 5GB, 500MB, 2GiB, 1000000)", text);
  const double bytes = std::floor(value * units.at(unit));
  if (!(bytes >= 1) || bytes > 9.0e18) fail(ctx, "size '{}' is out of range (1 byte .. 9e18 bytes)", text);
  return uint64_t(bytes);
}

void copy_model_side_files(const std::string& from_dir, const std::string& to_dir, const char* ctx) {
  for (const char* f : kModelSideFiles) {
    std::error_code ec;
    const fs::path src = fs::path(from_dir) / f;
    if (!fs::is_regular_file(src, ec)) continue;
    fs::copy_file(src, fs::path(to_dir) / f, fs::copy_options::overwrite_existing, ec);
    if (ec) fail(ctx, "{}: cannot copy: {}", src.string(), ec.message());
  }
}

MergeSummary merge_lora(const MergeOptions& opt) {
  return with_context("merge", [&] { return merge_impl(opt); });
}

ConvertLoraSummary convert_lora_layout(const std::string& adapter_dir, const std::string& model_dir, bool fused,
                                       const std::string& out_dir, bool force) {
  return with_context("convert-lora", [&] { return convert_impl(adapter_dir, model_dir, fused, out_dir, force); });
}

}  // namespace qt
