// safetensors: round trips through our writer, files assembled byte by byte (independent of the
// writer), every class of malformed input (each must throw "[safetensors] ..." naming the
// problem), sharded checkpoints, and the atomicity of writes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "io/safetensors.h"

using namespace qt;
namespace fs = std::filesystem;

namespace {

using Bytes = std::vector<uint8_t>;

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "qt_safetensors_XXXXXX").string();
    QT_ASSERT(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

void append_le(Bytes& b, uint64_t v, int nbytes) {
  for (int i = 0; i < nbytes; ++i) b.push_back(uint8_t(v >> (8 * i)));
}
void append_f32(Bytes& b, float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  append_le(b, u, 4);
}

// A file assembled by hand: 8-byte LE header length, header text, data.
Bytes file_bytes(const std::string& header, const Bytes& data) {
  Bytes b;
  append_le(b, header.size(), 8);
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

void write_bytes(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  QT_ASSERT(bool(out), "cannot write {}", path);
}

Bytes read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

// Runs f, which must throw qt::Error "[safetensors] ..." containing every one of `parts`.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("[safetensors] ", 0), 0u) << msg;
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "no qt::Error thrown (expected: " << parts.at(0) << ")";
}

// Writes a hand-made file with the given header and data, then opens it expecting an error.
void expect_bad_file(const std::string& header, const Bytes& data, const std::vector<std::string>& parts) {
  TempDir dir;
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, file_bytes(header, data));
  SCOPED_TRACE(header);
  expect_error([&] { SafetensorsFile f(path); }, parts);
}

Bytes tensor_bytes(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.raw());
  return Bytes(p, p + t.nbytes());
}

Tensor filled(const Shape& shape, DType dtype, uint8_t seed) {
  Tensor t = Tensor::empty(shape, dtype);
  auto* p = static_cast<uint8_t*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = uint8_t(seed + 37 * i);
  return t;
}

const std::string kOneF32 = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
const Bytes kEightBytes(8, 0);

}  // namespace

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(Safetensors, RoundTripsEveryDtypeZeroSizeAndMetadata) {
  TempDir dir;
  const std::string path = dir.file("all.safetensors");
  Tensor bf16 = Tensor::empty({3}, DType::BF16);
  const uint16_t bf16_bits[3] = {f32_to_bf16(1.0f), f32_to_bf16(-2.5f), 0x7fc0};
  std::memcpy(bf16.raw(), bf16_bits, sizeof bf16_bits);
  Tensor boolean = Tensor::empty({4}, DType::BOOL);
  const uint8_t bools[4] = {1, 0, 0, 1};
  std::memcpy(boolean.raw(), bools, 4);
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"z.f32", Tensor::from_vector<float>({1.5f, -0.25f, 3e38f, 0.0f, -1e-30f, 7.0f}, {2, 3})},
      {"a.f64", Tensor::from_vector<double>({3.141592653589793, -1e300}, {2})},
      {"bf16", bf16},
      {"f16", filled({2, 2}, DType::F16, 5)},
      {"i32", Tensor::from_vector<int32_t>({-7, 2147483647, 0}, {3, 1})},
      {"i64", Tensor::from_vector<int64_t>({std::numeric_limits<int64_t>::min(), 42}, {1, 2})},
      {"u8", Tensor::from_vector<uint8_t>({0, 255, 128}, {3})},
      {"bool", boolean},
      {"empty", Tensor::empty({0, 3}, DType::F32)},
      {"scalar", Tensor::from_vector<float>({9.0f}, {})},
      {"odd.bf16", filled({1, 1, 3}, DType::BF16, 11)},  // 6 bytes: the next tensor is misaligned
      {"after_odd.f32", Tensor::from_vector<float>({0.5f, 0.75f}, {2})},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "ünïcode \"quoted\""}};
  write_safetensors(path, tensors, metadata);

  // Header length is a multiple of 8 and offsets are contiguous in the given order.
  Bytes raw = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | raw[size_t(i)];
  EXPECT_EQ(n % 8, 0u);

  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata(), metadata);
  ASSERT_EQ(f.entries().size(), tensors.size());
  size_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    SCOPED_TRACE(name);
    const SafetensorsEntry& e = f.entries()[i];
    EXPECT_EQ(e.name, name);
    EXPECT_EQ(e.dtype, t.dtype());
    EXPECT_EQ(e.shape, t.shape());
    EXPECT_EQ(e.begin, offset);
    EXPECT_EQ(e.end, offset + t.nbytes());
    offset = e.end;
    Tensor v = f.view(name);
    EXPECT_EQ(v.dtype(), t.dtype());
    EXPECT_EQ(v.shape(), t.shape());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(v.raw()) % dtype_size(v.dtype()), 0u);
    EXPECT_EQ(tensor_bytes(v), tensor_bytes(t));
  }
  EXPECT_EQ(raw.size(), 8 + n + offset);
  EXPECT_EQ(f.view("empty").numel(), 0);
  EXPECT_EQ(f.view("scalar").data<float>()[0], 9.0f);
  EXPECT_TRUE(f.contains("bool"));
  EXPECT_FALSE(f.contains("nope"));
  expect_error([&] { f.entry("nope"); }, {"no tensor named 'nope'"});
}

TEST(Safetensors, EmptyFileRoundTrips) {
  TempDir dir;
  write_safetensors(dir.file("e.safetensors"), {});
  SafetensorsFile f(dir.file("e.safetensors"));
  EXPECT_TRUE(f.entries().empty());
  EXPECT_TRUE(f.metadata().empty());
}

TEST(Safetensors, ViewOutlivesTheFileObject) {
  TempDir dir;
  write_safetensors(dir.file("v.safetensors"), {{"x", Tensor::from_vector<float>({1, 2, 3}, {3})}});
  Tensor v;
  { v = SafetensorsFile(dir.file("v.safetensors")).view("x"); }
  EXPECT_EQ(v.data<float>()[2], 3.0f);
}

TEST(Safetensors, ReadsHandWrittenBytes) {
  // Header in an order that is neither sorted nor the data order, with metadata between the
  // tensors, a zero-size tensor, and a length of 4 mod 8: the data buffer starts 4-byte aligned,
  // so the I64 tensor is misaligned in the mapping and the F32 one is not.
  const std::string header =
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"__metadata__":{"format":"pt"},)"
      R"("a":{"shape":[1,1],"dtype":"I64","data_offsets":[16,24]}, "z":{"dtype":"U8","shape":[0],"data_offsets":[8,8]},)"
      R"("c":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}        )";
  ASSERT_EQ(header.size() % 8, 4u);
  Bytes data;
  for (uint16_t h : {0x3f80, 0xc000, 0x0000, 0x4049}) append_le(data, h, 2);  // bf16 1, -2, 0, 3.140625
  append_f32(data, 1.5f);
  append_f32(data, -2.25f);
  append_le(data, uint64_t(-7), 8);
  TempDir dir;
  write_bytes(dir.file("h.safetensors"), file_bytes(header, data));

  SafetensorsFile f(dir.file("h.safetensors"));
  ASSERT_EQ(f.entries().size(), 4u);
  EXPECT_EQ(f.entries()[0].name, "b");
  EXPECT_EQ(f.entries()[1].name, "a");
  EXPECT_EQ(f.entries()[2].name, "z");
  EXPECT_EQ(f.entries()[3].name, "c");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  Tensor b = f.view("b");
  EXPECT_EQ(b.shape(), Shape({2}));
  EXPECT_EQ(b.data<float>()[0], 1.5f);
  EXPECT_EQ(b.data<float>()[1], -2.25f);
  Tensor a = f.view("a");  // misaligned on disk: an aligned copy
  EXPECT_EQ(a.shape(), Shape({1, 1}));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.raw()) % 8, 0u);
  EXPECT_EQ(a.data<int64_t>()[0], -7);
  Tensor c = f.view("c").to(DType::F32);
  EXPECT_EQ(c.shape(), Shape({2, 2}));
  EXPECT_EQ(c.data<float>()[0], 1.0f);
  EXPECT_EQ(c.data<float>()[1], -2.0f);
  EXPECT_EQ(c.data<float>()[3], 3.140625f);
  EXPECT_EQ(f.view("z").numel(), 0);
  EXPECT_EQ(f.entry("z").dtype, DType::U8);
}

// ---------------------------------------------------------------------------------------------
// Malformed files

TEST(SafetensorsBad, TruncatedFileAtSeveralPoints) {
  TempDir dir;
  const std::string good = dir.file("good.safetensors");
  write_safetensors(good, {{"w", Tensor::from_vector<float>({1, 2, 3, 4}, {4})}});
  const Bytes full = read_bytes(good);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | full[size_t(i)];
  struct Cut { size_t at; const char* expect; };
  const Cut cuts[] = {{0, "too short"},         {3, "too short"},          {7, "too short"},
                      {8, "exceeds the file"},  {8 + n / 2, "exceeds the file"}, {8 + n - 1, "exceeds the file"},
                      {8 + n, "out of bounds"}, {full.size() - 1, "out of bounds"}};
  for (const Cut& c : cuts) {
    SCOPED_TRACE(c.at);
    const std::string path = dir.file("cut.safetensors");
    write_bytes(path, Bytes(full.begin(), full.begin() + std::ptrdiff_t(c.at)));
    expect_error([&] { SafetensorsFile f(path); }, {path, c.expect});
  }
}

TEST(SafetensorsBad, HeaderLength) {
  TempDir dir;
  const std::string path = dir.file("h.safetensors");
  Bytes b;
  append_le(b, 100, 8);
  b.push_back('{');
  write_bytes(path, b);
  expect_error([&] { SafetensorsFile f(path); }, {"header length 100 exceeds the file (9 bytes)"});

  Bytes giant;
  append_le(giant, uint64_t(1) << 63, 8);
  for (char ch : kOneF32) giant.push_back(uint8_t(ch));
  write_bytes(path, giant);
  expect_error([&] { SafetensorsFile f(path); }, {"header length 9223372036854775808 exceeds the file"});

  Bytes all_ones;
  append_le(all_ones, ~uint64_t(0), 8);
  write_bytes(path, all_ones);
  expect_error([&] { SafetensorsFile f(path); }, {"exceeds the file"});

  // A header length over the 100 MB cap in a (sparse) file large enough to hold it.
  const uint64_t over_cap = (uint64_t(100) << 20) + 8;
  Bytes len;
  append_le(len, over_cap, 8);
  write_bytes(path, len);
  fs::resize_file(path, 8 + over_cap);
  expect_error([&] { SafetensorsFile f(path); }, {"exceeds the limit"});
}

TEST(SafetensorsBad, HeaderJson) {
  expect_bad_file(R"({"w":{"dtype":"F32",)", kEightBytes, {"not valid JSON"});
  expect_bad_file("\xff\xfe", kEightBytes, {"not valid JSON"});
  expect_bad_file(R"({"w\xff":{}})", kEightBytes, {"not valid JSON"});  // invalid UTF-8
  expect_bad_file("", kEightBytes, {"not valid JSON"});
  expect_bad_file(R"([1, 2])", kEightBytes, {"header JSON is not an object"});
  expect_bad_file(R"("w")", kEightBytes, {"header JSON is not an object"});
  expect_bad_file(kOneF32 + " {}", kEightBytes, {"not valid JSON"});  // trailing garbage
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"U8","shape":[8],)"
                  R"("data_offsets":[0,8]}})",
                  kEightBytes, {"duplicate key 'w'"});
  expect_bad_file(std::string(100, '[') + std::string(100, ']'), kEightBytes, {"nested more than"});
  expect_bad_file(R"({"__metadata__":)" + std::string(50, '[') + std::string(50, ']') + "}", kEightBytes,
                  {"nested more than"});
}

TEST(SafetensorsBad, EntryFields) {
  expect_bad_file(R"({"w":[1]})", kEightBytes, {"tensor 'w'", "entry is not an object"});
  expect_bad_file(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", kEightBytes, {"tensor 'w'", "missing field 'dtype'"});
  expect_bad_file(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", kEightBytes, {"missing field 'shape'"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2]}})", kEightBytes, {"missing field 'data_offsets'"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"foo":1}})", kEightBytes,
                  {"tensor 'w'", "unexpected field 'foo'"});
  expect_bad_file(R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", kEightBytes, {"dtype is not a string"});
}

TEST(SafetensorsBad, Dtype) {
  expect_bad_file(R"({"fp8.weight":{"dtype":"F8_E4M3","shape":[8],"data_offsets":[0,8]}})", kEightBytes,
                  {"tensor 'fp8.weight'", "unsupported dtype 'F8_E4M3'"});
  expect_bad_file(R"({"w":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", kEightBytes,
                  {"unsupported dtype 'f32'"});
}

TEST(SafetensorsBad, Shape) {
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", kEightBytes,
                  {"tensor 'w'", "non-negative integers"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", kEightBytes, {"non-negative integers"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", kEightBytes, {"non-negative integers"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", kEightBytes, {"shape is not an array"});
  // Element count overflows 64 bits (even though a later dimension is 0) and 2^62 F32 elements
  // overflow the byte count.
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", kEightBytes,
                  {"too many elements"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,8]}})", kEightBytes,
                  {"too many elements"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", kEightBytes,
                  {"too many elements"});
  // shape x dtype size != byte count.
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", kEightBytes,
                  {"tensor 'w'", "[3] x F32 is 12 bytes but data_offsets span 8 bytes"});
  expect_bad_file(R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}})", kEightBytes,
                  {"is 4 bytes but data_offsets span 8 bytes"});
}

TEST(SafetensorsBad, DataOffsets) {
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", kEightBytes,
                  {"tensor 'w'", "end 16 is out of bounds of the data buffer (8 bytes)"});
  expect_bad_file(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[9,9]}})", kEightBytes, {"out of bounds"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", kEightBytes,
                  {"tensor 'w'", "begin 8 > end 4"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", kEightBytes, {"must be [begin, end]"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", kEightBytes, {"must be [begin, end]"});
  expect_bad_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":{"a":0}}})", kEightBytes, {"must be [begin, end]"});
  expect_bad_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,0]}})", kEightBytes,
                  {"begin 18446744073709551615 > end 0"});
}

TEST(SafetensorsBad, Overlap) {
  expect_bad_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                  R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                  kEightBytes, {"'a' [0, 8) and 'b' [6, 8) overlap"});
  expect_bad_file(R"({"b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]},)"
                  R"("a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})",
                  kEightBytes, {"overlap"});
  // Zero-size tensors own no bytes: one inside another's range is fine, as is a hole.
  TempDir dir;
  write_bytes(dir.file("ok.safetensors"),
              file_bytes(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                         R"("e":{"dtype":"F32","shape":[0,2],"data_offsets":[2,2]},)"
                         R"("b":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})",
                         kEightBytes));
  EXPECT_EQ(SafetensorsFile(dir.file("ok.safetensors")).entries().size(), 3u);
}

TEST(SafetensorsBad, Metadata) {
  expect_bad_file(R"({"__metadata__":{"n":1}})", {}, {"__metadata__ value of 'n' is not a string"});
  expect_bad_file(R"({"__metadata__":{"a":"x","n":{"k":"v"}}})", {}, {"value of 'n' is not a string"});
  expect_bad_file(R"({"__metadata__":["a"]})", {}, {"__metadata__ must be an object of strings"});
  expect_bad_file(R"({"__metadata__":"a"})", {}, {"__metadata__ must be an object of strings"});
}

TEST(SafetensorsBad, NotAFile) {
  TempDir dir;
  expect_error([&] { SafetensorsFile f(dir.file("missing.safetensors")); }, {"cannot open"});
  expect_error([&] { SafetensorsFile f(dir.path().string()); }, {"not a regular file"});
}

// ---------------------------------------------------------------------------------------------
// Checkpoints

namespace {
// Writes two shards and an index; `extra` adds entries to weight_map.
void write_sharded(const TempDir& dir, const std::string& index_json) {
  write_safetensors(dir.file("model-00001-of-00002.safetensors"),
                    {{"model.embed_tokens.weight", Tensor::from_vector<float>({1, 2, 3, 4}, {2, 2})},
                     {"model.norm.weight", Tensor::from_vector<float>({5, 6}, {2})}});
  write_safetensors(dir.file("model-00002-of-00002.safetensors"),
                    {{"lm_head.weight", Tensor::from_vector<float>({7, 8, 9, 10}, {2, 2})}});
  std::ofstream(dir.file("model.safetensors.index.json")) << index_json;
}
const std::string kGoodIndex = R"({"metadata": {"total_size": 40}, "weight_map": {
  "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
  "model.norm.weight": "model-00001-of-00002.safetensors",
  "lm_head.weight": "model-00002-of-00002.safetensors"}})";
}  // namespace

TEST(SafetensorsCheckpoint, SingleFileDirectoryAndPath) {
  TempDir dir;
  write_safetensors(dir.file("model.safetensors"),
                    {{"b", Tensor::from_vector<float>({1}, {1})}, {"a", Tensor::from_vector<float>({2}, {1})}});
  for (const std::string& p : {dir.path().string(), dir.file("model.safetensors")}) {
    SafetensorsCheckpoint ck(p);
    EXPECT_EQ(ck.names(), std::vector<std::string>({"a", "b"}));
    EXPECT_EQ(ck.view("a").data<float>()[0], 2.0f);
    EXPECT_EQ(ck.entry("b").shape, Shape({1}));
    expect_error([&] { ck.view("c"); }, {"no tensor named 'c'"});
  }
}

TEST(SafetensorsCheckpoint, Sharded) {
  TempDir dir;
  write_sharded(dir, kGoodIndex);
  Tensor lm_head;
  {
    SafetensorsCheckpoint ck(dir.path().string());
    EXPECT_EQ(ck.names(), std::vector<std::string>({"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}));
    EXPECT_TRUE(ck.contains("model.norm.weight"));
    EXPECT_FALSE(ck.contains("model.layers.0.mlp.gate.weight"));
    EXPECT_EQ(ck.view("model.norm.weight").data<float>()[1], 6.0f);
    lm_head = ck.view("lm_head.weight");
  }
  EXPECT_EQ(lm_head.shape(), Shape({2, 2}));
  EXPECT_EQ(lm_head.data<float>()[3], 10.0f);
}

TEST(SafetensorsCheckpoint, BadSharded) {
  const std::string shard1 = "model-00001-of-00002.safetensors", shard2 = "model-00002-of-00002.safetensors";
  auto expect_index_error = [&](const std::string& index, const std::vector<std::string>& parts) {
    TempDir dir;
    write_sharded(dir, index);
    SCOPED_TRACE(index);
    expect_error([&] { SafetensorsCheckpoint ck(dir.path().string()); }, parts);
  };
  // Missing shard.
  expect_index_error(R"({"weight_map": {"model.embed_tokens.weight": ")" + shard1 + R"(", "model.norm.weight": ")" +
                         shard1 + R"(", "lm_head.weight": "model-00003-of-00003.safetensors"}})",
                     {"shard 'model-00003-of-00003.safetensors'", "does not exist"});
  // Listed in the index but absent from its shard.
  expect_index_error(R"({"weight_map": {"model.embed_tokens.weight": ")" + shard1 + R"(", "model.norm.weight": ")" +
                         shard1 + R"(", "lm_head.weight": ")" + shard2 + R"(", "extra.weight": ")" + shard2 + R"("}})",
                     {"tensor 'extra.weight'", "is not in it"});
  // In a shard but absent from the index.
  expect_index_error(R"({"weight_map": {"model.embed_tokens.weight": ")" + shard1 + R"(", "lm_head.weight": ")" +
                         shard2 + R"("}})",
                     {"tensor 'model.norm.weight'", "not listed in the index"});
  // Assigned to the wrong shard.
  expect_index_error(R"({"weight_map": {"model.embed_tokens.weight": ")" + shard1 + R"(", "model.norm.weight": ")" +
                         shard2 + R"(", "lm_head.weight": ")" + shard2 + R"("}})",
                     {"tensor 'model.norm.weight' is assigned to shard '" + shard2 + "'", "is not in it"});
  // Bad index JSON and structure.
  expect_index_error(R"({"weight_map": {)", {"not valid JSON"});
  expect_index_error(R"([1])", {"\"weight_map\" object"});
  expect_index_error(R"({"weight_map": []})", {"\"weight_map\" object"});
  expect_index_error(R"({"weight_map": {"lm_head.weight": 3}})", {"weight_map value for 'lm_head.weight'"});
  expect_index_error(R"({"weight_map": {"lm_head.weight": "../model.safetensors"}})", {"plain file name"});
  expect_index_error(R"({"weight_map": {"lm_head.weight": ".."}})", {"plain file name"});
  expect_index_error(R"({"weight_map": {"lm_head.weight": ""}})", {"plain file name"});

  // The same name in two shards.
  TempDir dir;
  write_sharded(dir, kGoodIndex);
  write_safetensors(dir.file(shard2), {{"lm_head.weight", Tensor::from_vector<float>({7, 8, 9, 10}, {2, 2})},
                                       {"model.norm.weight", Tensor::from_vector<float>({5, 6}, {2})}});
  expect_error([&] { SafetensorsCheckpoint ck(dir.path().string()); }, {"tensor 'model.norm.weight' is in shards", "duplicate name across shards"});

  // A corrupt shard is reported with the shard's path.
  TempDir dir2;
  write_sharded(dir2, kGoodIndex);
  write_bytes(dir2.file(shard2), Bytes(5, 0));
  expect_error([&] { SafetensorsCheckpoint ck(dir2.path().string()); }, {shard2, "too short"});
}

TEST(SafetensorsCheckpoint, MissingFiles) {
  TempDir dir;
  expect_error([&] { SafetensorsCheckpoint ck(dir.path().string()); },
               {"neither model.safetensors nor model.safetensors.index.json"});
  expect_error([&] { SafetensorsCheckpoint ck(dir.file("nope")); }, {"no such file or directory"});
}

// ---------------------------------------------------------------------------------------------
// Writer

TEST(SafetensorsWrite, OverwritesAtomicallyAndLeavesNoTempFile) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  write_safetensors(path, {{"x", Tensor::from_vector<float>({1, 2}, {2})}});
  write_safetensors(path, {{"y", Tensor::from_vector<int64_t>({3}, {1})}}, {{"step", "2"}});
  SafetensorsFile f(path);
  ASSERT_EQ(f.entries().size(), 1u);
  EXPECT_EQ(f.view("y").data<int64_t>()[0], 3);
  EXPECT_EQ(f.metadata().at("step"), "2");
  EXPECT_EQ(dir.listing(), std::vector<std::string>({"w.safetensors"}));
}

TEST(SafetensorsWrite, FailureLeavesTargetUnchanged) {
  TempDir dir;
  const std::string path = dir.file("w.safetensors");
  write_safetensors(path, {{"x", Tensor::from_vector<float>({1, 2}, {2})}});
  const Bytes before = read_bytes(path);
  const Tensor t = Tensor::from_vector<float>({3}, {1});

  expect_error([&] { write_safetensors(path, {{"a", t}, {"b", t}, {"a", t}}); }, {"duplicate tensor name 'a'"});
  expect_error([&] { write_safetensors(path, {{"", t}}); }, {"tensor name is empty"});
  expect_error([&] { write_safetensors(path, {{"__metadata__", t}}); }, {"'__metadata__' is reserved"});
  expect_error([&] { write_safetensors(path, {{"u", Tensor()}}); }, {"tensor 'u' is undefined"});
  expect_error([&] { write_safetensors(path, {{"bad\xff", t}}); }, {"cannot encode the header"});
  expect_error([&] { write_safetensors(path, {{"x", t}}, {{"k", "\xc3"}}); }, {"cannot encode the header"});
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(dir.listing(), std::vector<std::string>({"w.safetensors"}));

  // Failure after the temp file was written: the rename over a non-empty directory fails.
  fs::create_directory(dir.file("target_dir"));
  std::ofstream(dir.file("target_dir/keep")) << "x";
  expect_error([&] { write_safetensors(dir.file("target_dir"), {{"x", t}}); }, {"cannot rename"});
  EXPECT_EQ(dir.listing(), std::vector<std::string>({"target_dir", "w.safetensors"}));

  // Failure to create the temp file.
  expect_error([&] { write_safetensors(dir.file("no/such/dir.safetensors"), {{"x", t}}); }, {"cannot create"});
  EXPECT_EQ(read_bytes(path), before);
}
