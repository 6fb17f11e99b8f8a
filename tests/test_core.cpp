// Core: dtype conversions and the tensor type.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/tensor.h"

using namespace qt;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly half-way between two bf16 values: ties to even (down).
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);
  // 1 + 3*2^-8 is half-way again: ties to even (up).
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);
  EXPECT_EQ(bf16_to_f32(0xc000), -2.0f);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(DType, F16RoundTripsEveryValue) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(f32_to_f16(f), h) << "h=" << h;
  }
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds to inf
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
}

TEST(DType, NamesRoundTrip) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I32, DType::I64, DType::U8, DType::BOOL}) {
    DType back;
    ASSERT_TRUE(dtype_from_name(dtype_name(t), &back));
    EXPECT_EQ(back, t);
  }
  DType d;
  EXPECT_FALSE(dtype_from_name("F8_E4M3", &d));
}

TEST(Tensor, ConvertReshapeSlice) {
  Tensor t = Tensor::from_vector<float>({1, 2, 3, 4, 5, 6}, {3, 2});
  Tensor b = t.to(DType::BF16).to(DType::F64);
  EXPECT_EQ(b.data<double>()[5], 6.0);
  Tensor r = t.reshape({2, 3});
  EXPECT_EQ(r.dim(1), 3);
  Tensor s = t.slice_rows(1, 3);
  EXPECT_EQ(s.numel(), 4);
  EXPECT_EQ(s.data<float>()[0], 3.0f);
  EXPECT_EQ(Tensor::zeros({4}, DType::I64).data<int64_t>()[3], 0);
}
