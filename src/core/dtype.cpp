#include "core/dtype.h"

#include <cmath>

#include "core/error.h"

namespace qt {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::U8: case DType::BOOL: return 1;
  }
  QT_ASSERT(false, "bad dtype {}", int(t));
}

std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  QT_ASSERT(false, "bad dtype {}", int(t));
}

bool dtype_from_name(std::string_view s, DType* out) {
  static const DType all[] = {DType::F32, DType::F64, DType::BF16, DType::F16,
                              DType::I32, DType::I64, DType::U8, DType::BOOL};
  for (DType t : all)
    if (dtype_name(t) == s) { *out = t; return true; }
  return false;
}

std::string_view device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow (incl. rounding) -> inf
  if (a < 0x38800000u) {                                   // subnormal or zero in f16
    // value = a as float; f16 subnormal unit = 2^-24
    float v;
    std::memcpy(&v, &a, 4);
    float q = std::nearbyint(v * 16777216.0f);  // round to nearest even (default mode)
    return uint16_t(sign | uint32_t(q));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (uint32_t(127 - 15) << 23);
  return uint16_t(sign | (r >> 13));
}

namespace {
template <typename T>
double load_as_double(const void* p, size_t i) { return double(static_cast<const T*>(p)[i]); }

double load(const void* src, DType st, size_t i) {
  switch (st) {
    case DType::F32: return load_as_double<float>(src, i);
    case DType::F64: return load_as_double<double>(src, i);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case DType::I32: return load_as_double<int32_t>(src, i);
    case DType::I64: return load_as_double<int64_t>(src, i);
    case DType::U8: return load_as_double<uint8_t>(src, i);
    case DType::BOOL: return static_cast<const uint8_t*>(src)[i] ? 1.0 : 0.0;
  }
  QT_ASSERT(false, "bad dtype");
}

void store(void* dst, DType dt, size_t i, double v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(dst)[i] = float(v); return;
    case DType::F64: static_cast<double*>(dst)[i] = v; return;
    case DType::BF16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(float(v)); return;
    case DType::F16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(float(v)); return;
    case DType::I32: static_cast<int32_t*>(dst)[i] = int32_t(v); return;
    case DType::I64: static_cast<int64_t*>(dst)[i] = int64_t(v); return;
    case DType::U8: static_cast<uint8_t*>(dst)[i] = uint8_t(v); return;
    case DType::BOOL: static_cast<uint8_t*>(dst)[i] = v != 0.0; return;
  }
  QT_ASSERT(false, "bad dtype");
}
}  // namespace

void convert_elements(void* dst, DType dt, const void* src, DType st, size_t n) {
  if (dt == st) {
    std::memcpy(dst, src, n * dtype_size(dt));
    return;
  }
  // Fast paths for the conversions the loader does on every weight.
  if (dt == DType::F32 && st == DType::BF16) {
    auto* d = static_cast<float*>(dst);
    auto* s = static_cast<const uint16_t*>(src);
    for (size_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
    return;
  }
  if (dt == DType::BF16 && st == DType::F32) {
    auto* d = static_cast<uint16_t*>(dst);
    auto* s = static_cast<const float*>(src);
    for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
    return;
  }
  // int64 <-> int32 must not pass through double for large values; everything else fits.
  if (dt == DType::I32 && st == DType::I64) {
    auto* d = static_cast<int32_t*>(dst);
    auto* s = static_cast<const int64_t*>(src);
    for (size_t i = 0; i < n; ++i) d[i] = int32_t(s[i]);
    return;
  }
  for (size_t i = 0; i < n; ++i) store(dst, dt, i, load(src, st, i));
}

}  // namespace qt
