// NF4 dequantization on the device (ops/cuda/nf4.h) equals the CPU reference (model/nf4.h) bit for
// bit: bf16 and fp32 outputs, with and without double quantization, on odd sizes (a ragged last
// block and an odd element count), a zero block, more than 256 blocks (two nested blocks) and a
// large matrix. The batched dequantization of model/cuda_nf4_weights.h (E tensors back to back, the
// QLoRA decoder's path) equals the CPU per tensor for quant-state dtypes bf16, f16 and f32, and the
// device quantizer (codes and absmax on the GPU, double quantization on the host) gives nf4_quantize's
// bytes. Skipped without a CUDA device. A failure prints the shape, the mismatch count and
// the first mismatching element (index, code, device and host values).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>

#include "cuda_parity.h"
#include "model/cuda_nf4_weights.h"
#include "model/nf4.h"
#include "ops/cuda/init_clip.h"
#include "ops/cuda/nf4.h"

namespace qt::testing {
namespace {

struct DeviceNf4 {
  Buffer<uint8_t> codes, absmax_codes;
  Buffer<float> quant_map, nested_absmax, nested_quant_map, absmax;
  cuda::Nf4DeviceView view;
};

DeviceNf4 upload(const Nf4Tensor& q) {
  DeviceNf4 d;
  d.codes = cuda::to_device(q.codes);
  d.quant_map = cuda::to_device(std::vector<float>(q.quant_map.begin(), q.quant_map.end()));
  d.view.codes = d.codes.get();
  d.view.quant_map = d.quant_map.get();
  if (q.double_quant) {
    d.absmax_codes = cuda::to_device(q.absmax_codes);
    d.nested_absmax = cuda::to_device(q.nested_absmax);
    d.nested_quant_map = cuda::to_device(q.nested_quant_map);
    d.view.absmax_codes = d.absmax_codes.get();
    d.view.nested_absmax = d.nested_absmax.get();
    d.view.nested_quant_map = d.nested_quant_map.get();
  } else {
    d.absmax = cuda::to_device(q.absmax);
    d.view.absmax = d.absmax.get();
  }
  d.view.offset = q.offset;
  d.view.n = q.numel();
  d.view.blocksize = q.blocksize;
  d.view.nested_blocksize = q.nested_blocksize;
  return d;
}

// Compares raw bits (uint16 for bf16, uint32 for fp32); reports the first mismatch.
template <typename Bits>
void expect_same_bits(const std::vector<Bits>& got, const Tensor& want, const Nf4Tensor& q, const std::string& what) {
  ASSERT_EQ(got.size(), size_t(want.numel())) << what;
  const Bits* w = static_cast<const Bits*>(want.raw());
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != w[i]) {
      if (first < 0) first = int64_t(i);
      ++bad;
    }
  if (bad == 0) return;
  const uint8_t byte = q.codes[size_t(first / 2)];
  const int code = first % 2 == 0 ? byte >> 4 : byte & 15;
  auto as_float = [](Bits b) {
    if constexpr (sizeof(Bits) == 2) return bf16_to_f32(b);
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  };
  ADD_FAILURE() << what << " shape " << shape_str(q.shape) << ": " << bad << " of " << got.size()
                << " elements differ; first at " << first << " (block " << first / q.blocksize << ", code " << code
                << "): device " << as_float(got[size_t(first)]) << " (0x" << std::hex << +got[size_t(first)]
                << "), host " << as_float(w[first]) << " (0x" << +w[first] << std::dec << ")";
}

void check(const Nf4Tensor& q, const std::string& what) {
  cuda::Context ctx;
  DeviceNf4 d = upload(q);
  const size_t n = size_t(q.numel());
  Buffer<cuda::bf16> out_bf(n);
  out_bf.fill_bytes(0xFF);  // NaN poison: an element never written fails
  Buffer<float> out_f(n);
  out_f.fill_bytes(0xFF);
  cuda::nf4_dequantize(ctx, d.view, out_bf.get());
  cuda::nf4_dequantize(ctx, d.view, out_f.get());
  ctx.synchronize();
  std::vector<uint16_t> got_bf(n);
  if (n) QT_CUDA_CHECK(cudaMemcpy(got_bf.data(), out_bf.get(), n * 2, cudaMemcpyDeviceToHost));
  std::vector<uint32_t> got_f(n);
  if (n) QT_CUDA_CHECK(cudaMemcpy(got_f.data(), out_f.get(), n * 4, cudaMemcpyDeviceToHost));
  // Host: fp32 products (storage F32 makes nf4_dequantize return them unrounded), then bf16 RNE.
  Nf4Tensor qf = q;
  qf.dtype = DType::F32;
  expect_same_bits(got_f, nf4_dequantize(qf, DType::F32), q, what + " fp32");
  qf.dtype = DType::BF16;
  expect_same_bits(got_bf, nf4_dequantize(qf, DType::BF16), q, what + " bf16");
  std::printf("  nf4 %s %s: %zu elements, %lld blocks checked\n", what.c_str(), shape_str(q.shape).c_str(), n,
              static_cast<long long>(q.num_blocks()));
}

TEST(CudaNf4, DequantizeEqualsCpuBitForBit) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(11);
  const std::vector<Shape> shapes = {{1}, {7, 9}, {48, 40}, {130, 129}, {257, 64}, {1024, 1000}, {4096, 2048}};
  for (const Shape& s : shapes) {
    std::vector<float> v = randn_bf16(size_t(shape_numel(s)), rng, 0.02f);
    if (v.size() >= 256)
      for (size_t i = 128; i < 192; ++i) v[i] = 0.0f;  // an all-zero block
    if (v.size() > 5) v[5] = 0.9f;                       // an outlier
    const Tensor w = Tensor::from_vector(v, s);
    const Nf4Tensor q = nf4_quantize(w, DType::BF16);
    check(q, "double-quant");
    Nf4Tensor plain = q;  // the same codes with fp32 absmax (bnb_4bit_use_double_quant false)
    plain.double_quant = false;
    plain.absmax = nf4_absmax_f32(q);
    check(plain, "fp32-absmax");
  }
}

// Time of the dequantization of one Qwen2.5-7B MLP matrix (18944 x 3584) to bf16 into a scratch buffer,
// for choosing between a scratch dequantization and a GEMM with a fused NF4 operand load: printed,
// with the bytes moved (codes + bf16 out) per second; the result is checked like the others.
TEST(CudaNf4, DequantizeThroughput) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(5);
  const Shape s{18944, 3584};
  const Tensor w = Tensor::from_vector(randn_bf16(size_t(shape_numel(s)), rng, 0.02f), s);
  const Nf4Tensor q = nf4_quantize(w, DType::BF16);
  check(q, "7B up_proj");
  cuda::Context ctx;
  DeviceNf4 d = upload(q);
  Buffer<cuda::bf16> out(size_t(q.numel()));
  cuda::Event t0, t1;
  cuda::nf4_dequantize(ctx, d.view, out.get());  // warm-up
  t0.record(ctx.stream());
  constexpr int kReps = 20;
  for (int i = 0; i < kReps; ++i) cuda::nf4_dequantize(ctx, d.view, out.get());
  t1.record(ctx.stream());
  t1.synchronize();
  const double ms = double(t1.elapsed_since(t0)) / kReps;
  const double bytes = double(q.codes.size()) + 2.0 * double(q.numel()) + double(q.absmax_codes.size());
  std::printf("  nf4 dequantize %s -> bf16: %.3f ms, %.0f GB/s\n", shape_str(s).c_str(), ms, bytes / ms / 1e6);
  EXPECT_GT(ms, 0.0);
}

// Values of `count` tensors of n elements, bf16-rounded: normal(0, 0.02) with an outlier, an all-zero
// block, a block of tiny values and a block of one repeated value (every element on absmax) per tensor.
std::vector<float> quantize_inputs(int64_t count, int64_t n, std::mt19937_64& rng) {
  std::vector<float> v = randn_bf16(size_t(count * n), rng, 0.02f);
  for (int64_t e = 0; e < count; ++e) {
    float* t = v.data() + e * n;
    t[n / 2] = round_bf16(0.75f * float(e + 1));
    if (n >= 4 * 64) {
      for (int64_t i = 64; i < 128; ++i) t[i] = 0.0f;
      for (int64_t i = 128; i < 192; ++i) t[i] = round_bf16(1e-30f * float(i - 150));
      for (int64_t i = 192; i < 256; ++i) t[i] = round_bf16(-0.03125f);
    }
  }
  return v;
}

TEST(CudaNf4, DeviceQuantizeEqualsCpuBytes) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(23);
  cuda::Context ctx;
  struct Case {
    int64_t count;
    Shape shape;
  };
  // odd n (padding nibble), a ragged last block, > 256 blocks (several nested blocks), several tensors
  const std::vector<Case> cases = {{1, {1}}, {3, {5, 7}}, {2, {33, 65}}, {4, {96, 64}}, {2, {256, 130}}, {3, {1024, 200}}};
  for (const Case& c : cases) {
    const int64_t n = shape_numel(c.shape);
    const std::vector<float> v = quantize_inputs(c.count, n, rng);
    Buffer<cuda::bf16> x = dev_bf16(v);
    const std::vector<Nf4Tensor> got = nf4_quantize_on_device(ctx, x.get(), c.count, c.shape);
    ASSERT_EQ(got.size(), size_t(c.count));
    for (int64_t e = 0; e < c.count; ++e) {
      const std::string what = shape_str(c.shape) + " tensor " + std::to_string(e);
      const Tensor w = Tensor::from_vector(std::vector<float>(v.begin() + e * n, v.begin() + (e + 1) * n), c.shape)
                           .to(DType::BF16);
      const Nf4Tensor want = nf4_quantize(w, DType::BF16);
      const Nf4Tensor& have = got[size_t(e)];
      EXPECT_EQ(have.shape, want.shape) << what;
      EXPECT_EQ(have.dtype, want.dtype) << what;
      EXPECT_EQ(have.double_quant, want.double_quant) << what;
      EXPECT_EQ(have.codes, want.codes) << what << ": codes";
      EXPECT_EQ(have.absmax_codes, want.absmax_codes) << what << ": absmax codes";
      EXPECT_EQ(have.nested_absmax, want.nested_absmax) << what << ": nested absmax";
      EXPECT_EQ(have.quant_map, want.quant_map) << what;
      EXPECT_EQ(have.nested_quant_map, want.nested_quant_map) << what;
      uint32_t a = 0, b = 0;
      std::memcpy(&a, &have.offset, 4), std::memcpy(&b, &want.offset, 4);
      EXPECT_EQ(a, b) << what << ": offset " << have.offset << " vs " << want.offset;
    }
  }
}

// CudaNf4Group: host NF4 tensors uploaded as one group, dequantized by the batched kernel, equal the
// CPU's values as the bf16 engine holds them: nf4_dequantize to the quant-state dtype, widened to
// fp32, rounded to bf16 (for f16 that is two roundings; for bf16 and f32 one).
TEST(CudaNf4, BatchedDequantizeEqualsCpuPerTensor) {
  QT_SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(31);
  cuda::Context ctx;
  for (DType storage : {DType::BF16, DType::F16, DType::F32})
    for (const auto& [count, shape] : std::vector<std::pair<int64_t, Shape>>{{1, {48, 40}}, {5, {33, 65}}, {3, {520, 64}}}) {
      const int64_t n = shape_numel(shape);
      const std::vector<float> v = quantize_inputs(count, n, rng);
      std::vector<Nf4Tensor> qs;
      for (int64_t e = 0; e < count; ++e)
        qs.push_back(nf4_quantize(Tensor::from_vector(std::vector<float>(v.begin() + e * n, v.begin() + (e + 1) * n), shape),
                                  storage));
      std::vector<const Nf4Tensor*> ptrs;
      for (const Nf4Tensor& q : qs) ptrs.push_back(&q);
      CudaNf4Group g;
      g.upload(ptrs, "test");
      ASSERT_EQ(g.numel(), count * n);
      Buffer<cuda::bf16> out(size_t(count * n));
      out.fill_bytes(0xFF);
      g.dequantize(ctx, out.get());
      ctx.synchronize();
      std::vector<uint16_t> got(size_t(count * n));
      QT_CUDA_CHECK(cudaMemcpy(got.data(), out.get(), got.size() * 2, cudaMemcpyDeviceToHost));
      for (int64_t e = 0; e < count; ++e) {
        const Tensor want = nf4_dequantize(qs[size_t(e)], storage).to(DType::F32).to(DType::BF16);
        expect_same_bits(std::vector<uint16_t>(got.begin() + e * n, got.begin() + (e + 1) * n), want, qs[size_t(e)],
                         "batched " + std::string(dtype_name(storage)) + " tensor " + std::to_string(e));
      }
      // A range of tensors (a chunk of experts) on its own: the same values, nothing past the range.
      const int64_t e0 = count / 2, e1 = count;
      out.fill_bytes(0xFF);
      g.dequantize(ctx, out.get(), e0, e1);
      ctx.synchronize();
      std::vector<uint16_t> part(size_t(count * n));
      QT_CUDA_CHECK(cudaMemcpy(part.data(), out.get(), part.size() * 2, cudaMemcpyDeviceToHost));
      EXPECT_TRUE(std::equal(part.begin(), part.begin() + (e1 - e0) * n, got.begin() + e0 * n)) << "range";
      EXPECT_TRUE(std::all_of(part.begin() + (e1 - e0) * n, part.end(), [](uint16_t x) { return x == 0xFFFF; }))
          << "the range wrote past its tensors";
    }
}

// Time of the QLoRA decoder's per-layer dequantization (batched kernel, bf16 out) for one projection
// kind of a Qwen3-30B-A3B MoE layer (128 experts of 768 x 2048) and the MLP matrix of Qwen2.5-7B
// (18944 x 3584), random weights quantized on the device; the first and last tensors are checked
// against the CPU. Printed with the bytes moved per second (codes + absmax codes + bf16 out).
TEST(CudaNf4, BatchedDequantizeThroughput) {
  QT_SKIP_WITHOUT_GPU();
  cuda::Context ctx;
  for (const auto& [count, shape] : std::vector<std::pair<int64_t, Shape>>{{128, {768, 2048}}, {1, {18944, 3584}}}) {
    const int64_t n = shape_numel(shape);
    Buffer<cuda::bf16> x(size_t(count * n));
    cuda::fill_normal(ctx, x.get(), count * n, 0.f, 0.02f, 99);
    const std::vector<Nf4Tensor> qs = nf4_quantize_on_device(ctx, x.get(), count, shape);
    std::vector<const Nf4Tensor*> ptrs;
    for (const Nf4Tensor& q : qs) ptrs.push_back(&q);
    CudaNf4Group g;
    g.upload(ptrs, "throughput");
    Buffer<cuda::bf16> out(size_t(count * n));
    g.dequantize(ctx, out.get());  // warm-up, and the result checked below
    cuda::Event t0, t1;
    t0.record(ctx.stream());
    constexpr int kReps = 10;
    for (int i = 0; i < kReps; ++i) g.dequantize(ctx, out.get());
    t1.record(ctx.stream());
    t1.synchronize();
    const double ms = double(t1.elapsed_since(t0)) / kReps;
    const double bytes = double(count) * (double(n) / 2 + double(n) / 64 + 2.0 * double(n));
    std::printf("  nf4 batched dequantize %lld x %s -> bf16: %.3f ms, %.0f GB/s\n", static_cast<long long>(count),
                shape_str(shape).c_str(), ms, bytes / ms / 1e6);
    std::vector<uint16_t> got(size_t(count * n));
    QT_CUDA_CHECK(cudaMemcpy(got.data(), out.get(), got.size() * 2, cudaMemcpyDeviceToHost));
    for (int64_t e : {int64_t(0), count - 1})
      expect_same_bits(std::vector<uint16_t>(got.begin() + e * n, got.begin() + (e + 1) * n),
                       nf4_dequantize(qs[size_t(e)], DType::BF16), qs[size_t(e)], "throughput tensor " + std::to_string(e));
  }
}

}  // namespace
}  // namespace qt::testing
