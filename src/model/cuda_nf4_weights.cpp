// NF4 base weights on the device (see cuda_nf4_weights.h).
#ifdef QT_HAVE_CUDA
#include "model/cuda_nf4_weights.h"

#include <cstring>

#include "core/error.h"
#include "ops/cuda/check.h"

namespace qt {

namespace {

// Byte offsets of the parts of one group's allocation.
struct Layout {
  size_t codes = 0, absmax_codes = 0, nested_absmax = 0, quant_map = 0, nested_quant_map = 0, offsets = 0, total = 0;
};
Layout layout(int64_t count, int64_t n, int64_t blocksize, int64_t nested_blocksize) {
  const auto c = size_t(count), nb = size_t((n + blocksize - 1) / blocksize);
  const size_t nb2 = (nb + size_t(nested_blocksize) - 1) / size_t(nested_blocksize);
  Layout l;
  l.absmax_codes = c * size_t((n + 1) / 2);
  l.nested_absmax = (l.absmax_codes + c * nb + 3) / 4 * 4;
  l.quant_map = l.nested_absmax + 4 * c * nb2;
  l.nested_quant_map = l.quant_map + 4 * c * 16;
  l.offsets = l.nested_quant_map + 4 * c * 256;
  l.total = l.offsets + 4 * c;
  return l;
}

template <typename T>
void put(std::vector<uint8_t>& blob, size_t at, const T* src, size_t n) {
  QT_ASSERT(at + n * sizeof(T) <= blob.size(), "NF4 blob overflow");
  if (n) std::memcpy(blob.data() + at, src, n * sizeof(T));
}

}  // namespace

void CudaNf4Group::upload(const std::vector<const Nf4Tensor*>& ts, const std::string& what) {
  QT_ASSERT(!ts.empty(), "{}: no tensors", what);
  const Nf4Tensor& f = *ts[0];
  const int64_t count = int64_t(ts.size()), n = f.numel(), nb = f.num_blocks();
  for (const Nf4Tensor* t : ts) {
    if (!t->double_quant) fail("cuda", "{}: NF4 without double quantization is not supported on the GPU", what);
    if (t->numel() != n || t->blocksize != f.blocksize || t->nested_blocksize != f.nested_blocksize)
      fail("cuda", "{}: the NF4 tensors of one projection differ in size or block size", what);
    if (t->dtype != f.dtype || (f.dtype != DType::BF16 && f.dtype != DType::F16 && f.dtype != DType::F32))
      fail("cuda", "{}: NF4 quant-state dtype {} (bfloat16, float16 or float32, one per projection)", what,
           dtype_name(t->dtype));
    if (t->nested_quant_map.size() != 256 || int64_t(t->absmax_codes.size()) != nb ||
        int64_t(t->codes.size()) != (n + 1) / 2)
      fail("cuda", "{}: malformed NF4 tensor", what);
  }
  const Layout l = layout(count, n, f.blocksize, f.nested_blocksize);
  const int64_t nb2 = (nb + f.nested_blocksize - 1) / f.nested_blocksize;
  std::vector<uint8_t> blob(l.total, 0);
  for (int64_t e = 0; e < count; ++e) {
    const Nf4Tensor& t = *ts[size_t(e)];
    if (int64_t(t.nested_absmax.size()) != nb2) fail("cuda", "{}: malformed NF4 tensor", what);
    put(blob, l.codes + size_t(e) * t.codes.size(), t.codes.data(), t.codes.size());
    put(blob, l.absmax_codes + size_t(e * nb), t.absmax_codes.data(), size_t(nb));
    put(blob, l.nested_absmax + 4 * size_t(e * nb2), t.nested_absmax.data(), size_t(nb2));
    put(blob, l.quant_map + 4 * size_t(e * 16), t.quant_map.data(), 16);
    put(blob, l.nested_quant_map + 4 * size_t(e * 256), t.nested_quant_map.data(), 256);
    put(blob, l.offsets + 4 * size_t(e), &t.offset, 1);
  }
  mem_ = cuda::Buffer<uint8_t>(blob.size());
  mem_.upload(blob);
  const uint8_t* base = mem_.get();
  view_ = {};
  view_.codes = base + l.codes;
  view_.absmax_codes = base + l.absmax_codes;
  view_.nested_absmax = reinterpret_cast<const float*>(base + l.nested_absmax);
  view_.quant_map = reinterpret_cast<const float*>(base + l.quant_map);
  view_.nested_quant_map = reinterpret_cast<const float*>(base + l.nested_quant_map);
  view_.offsets = reinterpret_cast<const float*>(base + l.offsets);
  view_.count = count, view_.n = n;
  view_.blocksize = f.blocksize, view_.nested_blocksize = f.nested_blocksize;
  view_.f16_storage = f.dtype == DType::F16;
}


void CudaNf4Group::dequantize(const cuda::Context& ctx, cuda::bf16* out) const { dequantize(ctx, out, 0, view_.count); }

void CudaNf4Group::dequantize(const cuda::Context& ctx, cuda::bf16* out, int64_t e0, int64_t e1) const {
  QT_ASSERT(mem_.size() > 0 && 0 <= e0 && e0 < e1 && e1 <= view_.count, "dequantize of tensors [{}, {}) of {}", e0, e1,
            view_.count);
  const int64_t n = view_.n, nb = (n + view_.blocksize - 1) / view_.blocksize;
  const int64_t nb2 = (nb + view_.nested_blocksize - 1) / view_.nested_blocksize;
  cuda::Nf4BatchView v = view_;  // each per-tensor array advanced by e0 tensors (layout above)
  v.codes += e0 * ((n + 1) / 2);
  v.absmax_codes += e0 * nb;
  v.nested_absmax += e0 * nb2;
  v.quant_map += 16 * e0;
  v.nested_quant_map += 256 * e0;
  v.offsets += e0;
  v.count = e1 - e0;
  cuda::nf4_dequantize_batched(ctx, v, out);
}

std::vector<Nf4Tensor> nf4_quantize_on_device(cuda::Context& ctx, const cuda::bf16* x, int64_t count,
                                              const Shape& shape) {
  Nf4Tensor proto;
  proto.shape = shape;
  proto.dtype = DType::BF16;
  proto.quant_map = nf4_table();
  const int64_t n = proto.numel(), nb = proto.num_blocks(), cb = (n + 1) / 2;
  cuda::Buffer<uint8_t> codes(size_t(count * cb));
  cuda::Buffer<float> absmax(size_t(count * nb));
  cuda::nf4_quantize_blocks(ctx, x, count, n, codes.get(), absmax.get());
  ctx.synchronize();
  const std::vector<uint8_t> hc = codes.download();
  const std::vector<float> ha = absmax.download();
  std::vector<Nf4Tensor> out(size_t(count), proto);
#pragma omp parallel for schedule(dynamic)
  for (int64_t e = 0; e < count; ++e) {
    Nf4Tensor& t = out[size_t(e)];
    t.codes.assign(hc.begin() + e * cb, hc.begin() + (e + 1) * cb);
    nf4_double_quantize(std::vector<float>(ha.begin() + e * nb, ha.begin() + (e + 1) * nb), t);
  }
  return out;
}

}  // namespace qt
#endif
