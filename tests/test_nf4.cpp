// NF4 (bitsandbytes format): the C++ quantizer reproduces, byte for byte, the fixture written by
// tools/make_nf4_fixture.py (an independent Python implementation of the documented algorithm),
// dequantization matches bit for bit, hand-checked small cases, and the serialized form round-trips.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "io/safetensors.h"
#include "model/nf4.h"
#include "test_files.h"

using namespace qt;

namespace {

std::string fixture_path() { return std::string(QT_SOURCE_DIR) + "/tests/fixtures/nf4_bnb.safetensors"; }

std::vector<uint8_t> bytes_of(const Tensor& t) {
  const uint8_t* p = static_cast<const uint8_t*>(t.raw());
  return std::vector<uint8_t>(p, p + t.nbytes());
}


}  // namespace

TEST(Nf4, TableCodesAndThresholds) {
  const auto& t = nf4_table();
  for (int k = 0; k < 16; ++k) EXPECT_EQ(nf4_code(t[size_t(k)]), k) << "table value " << t[size_t(k)];
  EXPECT_EQ(nf4_code(std::nanf("")), 0);
  EXPECT_EQ(nf4_code(2.0f), 15);
  EXPECT_EQ(nf4_code(-2.0f), 0);
  // A value on a threshold goes to the lower code; the next float up to the upper one.
  const float th = 0.03979014977812767f;
  EXPECT_EQ(nf4_code(th), 7);
  EXPECT_EQ(nf4_code(std::nextafter(th, 1.0f)), 8);
}

TEST(Nf4, DynamicMapShapeAndSearch) {
  const std::vector<float>& m = bnb_dynamic_map();
  ASSERT_EQ(m.size(), 256u);
  EXPECT_EQ(m[0], -0.99296875f);
  EXPECT_EQ(m[127], 0.0f);
  EXPECT_EQ(m[255], 1.0f);
  EXPECT_EQ(m[254], 0.99296875f);
  for (size_t k = 1; k < 256; ++k) EXPECT_LT(m[k - 1], m[k]) << k;
  for (int k = 0; k < 256; ++k) EXPECT_EQ(dynamic_map_code(m, m[size_t(k)]), k) << "entry " << k;
  // Against the nearest entry by fp32 midpoints (ties to the even index), on random values.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 20000; ++i) {
    const float x = i % 3 == 0 ? u(rng) * 1e-3f : u(rng);
    int below = -1;
    for (int k = 0; k < 256; ++k)
      if (x > m[size_t(k)]) below = k;
    int want;
    if (below < 0) want = 0;
    else if (below == 255) want = 255;
    else {
      const float mid = (m[size_t(below)] + m[size_t(below + 1)]) * 0.5f;
      want = x > mid ? below + 1 : x < mid ? below : (below % 2 == 0 ? below : below + 1);
    }
    ASSERT_EQ(dynamic_map_code(m, x), want) << "x = " << x;
  }
  EXPECT_EQ(dynamic_map_code(m, std::nanf("")), 0);
}

TEST(Nf4, HandCheckedBlock) {
  // One block of 5 values (ragged), absmax 2: normalised 1, -0.5, 0.25, 0, 0.1.
  const Tensor w = Tensor::from_vector<float>({2.0f, -1.0f, 0.5f, 0.0f, 0.2f}, {5});
  const Nf4Tensor q = nf4_quantize(w, DType::F32);
  ASSERT_EQ(q.codes.size(), 3u);
  // 1 -> 15; -0.5 -> 2 (between -0.61 and -0.46); 0.25 -> 10; 0 -> 7; 0.1 -> 8; padding 0 -> 7.
  EXPECT_EQ(q.codes[0], 0xF2);
  EXPECT_EQ(q.codes[1], 0xA7);
  EXPECT_EQ(q.codes[2], 0x87);
  // A single block: offset = absmax, the centred value is 0, nested absmax 0 -> NaN -> code 0;
  // dequantized absmax = map[0] * 0 + 2 = 2 exactly.
  EXPECT_EQ(q.offset, 2.0f);
  ASSERT_EQ(q.nested_absmax.size(), 1u);
  EXPECT_EQ(q.nested_absmax[0], 0.0f);
  EXPECT_EQ(q.absmax_codes[0], 0);
  const Tensor d = nf4_dequantize(q, DType::F32);
  const float* p = d.data<float>();
  const auto& t = nf4_table();
  EXPECT_EQ(p[0], 2.0f);
  EXPECT_EQ(p[1], t[2] * 2.0f);
  EXPECT_EQ(p[2], t[10] * 2.0f);
  EXPECT_EQ(p[3], 0.0f);
  EXPECT_EQ(p[4], t[8] * 2.0f);
}

TEST(Nf4, ZeroBlockAndErrorBound) {
  // 3 blocks, the middle one all zero: its codes are 0 (0 * inf = NaN) and it dequantizes to
  // -absmax_reconstructed, as bitsandbytes does.
  std::vector<float> v(192);
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  for (size_t i = 0; i < v.size(); ++i) v[i] = (i >= 64 && i < 128) ? 0.0f : nd(rng);
  const Nf4Tensor q = nf4_quantize(Tensor::from_vector(v, {3, 64}), DType::F32);
  for (size_t k = 32; k < 64; ++k) EXPECT_EQ(q.codes[k], 0) << k;
  const std::vector<float> amax = nf4_absmax_f32(q);
  const Tensor d = nf4_dequantize(q, DType::F32);
  for (int64_t j = 64; j < 128; ++j) EXPECT_EQ(d.data<float>()[j], -1.0f * amax[1]);
  // Other blocks: error within half the widest NF4 gap of the block's absmax (+ the absmax error).
  for (int64_t j = 0; j < 192; ++j) {
    if (j >= 64 && j < 128) continue;
    float true_amax = 0;
    for (int64_t k = j / 64 * 64; k < j / 64 * 64 + 64; ++k) true_amax = std::max(true_amax, std::fabs(v[size_t(k)]));
    EXPECT_LE(std::fabs(d.data<float>()[j] - v[size_t(j)]), 0.1525f * true_amax + std::fabs(amax[size_t(j / 64)] - true_amax))
        << j;
  }
}

TEST(Nf4, PythonFloatRepr) {
  EXPECT_EQ(python_float_repr(0.1), "0.1");
  EXPECT_EQ(python_float_repr(0.75), "0.75");
  EXPECT_EQ(python_float_repr(1e-05), "1e-05");
  EXPECT_EQ(python_float_repr(1.5e-05), "1.5e-05");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(0.000123), "0.000123");
  EXPECT_EQ(python_float_repr(123.0), "123.0");
  EXPECT_EQ(python_float_repr(-2.5), "-2.5");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1234567890123456.0), "1234567890123456.0");
  EXPECT_EQ(python_float_repr(0.0), "0.0");
  EXPECT_EQ(python_float_repr(double(0.0306785199791193f)), "0.0306785199791193");
}

TEST(Nf4, FixtureBytesAndDequantizedBits) {
  SafetensorsCheckpoint fx(fixture_path());
  int tensors = 0;
  for (const std::string& name : fx.names()) {
    const std::string suffix = ".input";
    if (name.size() < suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    const std::string base = name.substr(0, name.size() - suffix.size());
    const Tensor input = fx.view(name);
    SCOPED_TRACE(base + " " + shape_str(input.shape()) + " " + std::string(dtype_name(input.dtype())));
    const Nf4Tensor q = nf4_quantize(input, input.dtype());
    for (const auto& [tname, t] : nf4_to_bnb_tensors(base + ".weight", q)) {
      ASSERT_TRUE(fx.contains(tname)) << tname;
      const Tensor want = fx.view(tname);
      EXPECT_EQ(t.shape(), want.shape()) << tname;
      EXPECT_EQ(t.dtype(), want.dtype()) << tname;
      const std::vector<uint8_t> a = bytes_of(t), b = bytes_of(want);
      size_t first = 0;
      while (first < std::min(a.size(), b.size()) && a[first] == b[first]) ++first;
      EXPECT_TRUE(a == b) << tname << ": first differing byte " << first << " of " << b.size();
    }
    // Dequantizing the fixture's stored state (read back through the loader) gives its bits.
    const Nf4Tensor stored = nf4_from_bnb(fx, base + ".weight");
    const Tensor d = nf4_dequantize(stored, stored.dtype);
    EXPECT_EQ(bytes_of(d), bytes_of(fx.view(base + ".dequantized")));
    ++tensors;
  }
  EXPECT_EQ(tensors, 5);
}

TEST(Nf4, SerializedRoundTripAndValidation) {
  test::TempDir dir("nf4");
  std::vector<float> v(300);
  for (size_t i = 0; i < v.size(); ++i) v[i] = std::sin(float(i)) * 0.05f;
  const Nf4Tensor q = nf4_quantize(Tensor::from_vector(v, {20, 15}).to(DType::BF16), DType::BF16);
  const std::string path = dir.str() + "/m.safetensors";
  write_safetensors(path, nf4_to_bnb_tensors("x.weight", q));
  {
    SafetensorsCheckpoint ck(path);
    EXPECT_TRUE(is_bnb_4bit_weight(ck, "x.weight"));
    EXPECT_EQ(bnb_4bit_companions(ck, "x.weight").size(), 5u);
    const Nf4Tensor r = nf4_from_bnb(ck, "x.weight");
    EXPECT_EQ(r.shape, q.shape);
    EXPECT_EQ(r.dtype, DType::BF16);
    EXPECT_EQ(r.codes, q.codes);
    EXPECT_EQ(r.absmax_codes, q.absmax_codes);
    EXPECT_EQ(r.offset, q.offset);
    EXPECT_EQ(bytes_of(nf4_dequantize(r, DType::BF16)), bytes_of(nf4_dequantize(q, DType::BF16)));
  }
  {
    // Without double quantization (bnb_4bit_use_double_quant false): fp32 absmax, no nested tensors.
    Nf4Tensor plain = q;
    plain.double_quant = false;
    plain.absmax = nf4_absmax_f32(q);
    const std::string p2 = dir.str() + "/plain.safetensors";
    write_safetensors(p2, nf4_to_bnb_tensors("x.weight", plain));
    SafetensorsCheckpoint ck(p2);
    EXPECT_EQ(bnb_4bit_companions(ck, "x.weight").size(), 3u);
    const Nf4Tensor r = nf4_from_bnb(ck, "x.weight");
    EXPECT_FALSE(r.double_quant);
    EXPECT_EQ(r.absmax, plain.absmax);
    EXPECT_EQ(bytes_of(nf4_dequantize(r, DType::BF16)), bytes_of(nf4_dequantize(q, DType::BF16)));
    const Tensor js = ck.view("x.weight.quant_state.bitsandbytes__nf4");
    EXPECT_EQ(std::string(static_cast<const char*>(js.raw()), js.nbytes()),
              R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [20, 15]})");
  }
  // Corruptions give one-line [nf4] errors.
  auto expect_error = [&](std::vector<std::pair<std::string, Tensor>> ts, const std::string& what) {
    write_safetensors(path, ts);
    SafetensorsCheckpoint ck(path);
    try {
      nf4_from_bnb(ck, "x.weight");
      ADD_FAILURE() << "no error for " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("[nf4] x.weight"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  auto ts = nf4_to_bnb_tensors("x.weight", q);
  auto bad = ts;
  bad[0].second = Tensor::zeros({10, 1}, DType::U8);
  expect_error(bad, "elements, expected 150");
  bad = ts;
  bad[2].second = bad[2].second.clone();  // the copies share storage with ts
  bad[2].second.data<float>()[3] = 0.5f;
  expect_error(bad, "not the NF4 table");
  bad = ts;
  bad.erase(bad.begin() + 3);
  expect_error(bad, "nested_absmax: missing");
  bad = ts;
  const std::string js = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [20, -15]})";
  bad.back().second = Tensor::from_vector(std::vector<uint8_t>(js.begin(), js.end()), {int64_t(js.size())});
  expect_error(bad, "negative dimension");
  bad = ts;
  const std::string huge = R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4294967296, 4294967296]})";
  bad.back().second = Tensor::from_vector(std::vector<uint8_t>(huge.begin(), huge.end()), {int64_t(huge.size())});
  expect_error(bad, "too large");
  bad = ts;
  bad.back().second = Tensor::from_vector(std::vector<uint8_t>{'{', 'x'}, {2});
  expect_error(bad, "bad quant_state JSON");
}
