// Element types and the scalar conversions between them.
// bf16 = the top 16 bits of an IEEE f32 (round-to-nearest-even on conversion from f32);
// f16 = IEEE binary16 (with subnormals, inf and NaN).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace qt {

enum class DType : uint8_t { F32, F64, BF16, F16, I32, I64, U8, BOOL };
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);      // "F32", "BF16", ... (safetensors spelling)
bool dtype_from_name(std::string_view s, DType* out);  // false when unknown
std::string_view device_name(Device d);    // "cpu", "cuda"

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                        // round to nearest even
  return uint16_t(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements from src (type st) to dst (type dt). Float types and integers in any
// direction; value-changing narrowing follows C++ conversion rules for integers.
void convert_elements(void* dst, DType dt, const void* src, DType st, size_t n);

}  // namespace qt
