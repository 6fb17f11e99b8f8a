// The NF4 decision tree of bitsandbytes' quantizer (model/nf4.h), shared by the CPU quantizer and the
// CUDA one (ops/cuda/nf4.cu) so both give the same code for the same fp32 value: thresholds are the
// midpoints between neighbouring NF4 table values (float32 literals); a value on a threshold goes
// down; NaN fails every test -> code 0.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define QT_NF4_HD __host__ __device__
#else
#define QT_NF4_HD
#endif

namespace qt {

QT_NF4_HD inline uint8_t nf4_code_of(float x) {
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

}  // namespace qt
