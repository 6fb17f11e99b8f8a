#include "core/tensor.h"

#include <cstdlib>
#include <cstring>

namespace qt {

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  QT_ASSERT(device == Device::CPU, "Tensor::empty on {} is not available in this build", device_name(device));
  for (int64_t d : shape) QT_ASSERT(d >= 0, "negative dimension in {}", shape_str(shape));
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  QT_ASSERT(p != nullptr, "out of host memory allocating {} bytes", bytes);
  t.storage_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.data_ = p;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_zero();
  return t;
}

Tensor Tensor::view_of(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> keepalive, Device device) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  t.data_ = data;
  t.storage_ = std::move(keepalive);
  return t;
}

Tensor Tensor::reshape(const Shape& shape) const {
  QT_ASSERT(shape_numel(shape) == numel(), "reshape {} -> {}", shape_str(shape_), shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::to(DType dtype) const {
  QT_ASSERT(device_ == Device::CPU, "Tensor::to on {}", device_name(device_));
  Tensor t = empty(shape_, dtype);
  convert_elements(t.data_, dtype, data_, dtype_, size_t(numel()));
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  QT_ASSERT(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0], "slice_rows [{}, {}) of {}", begin,
            end, shape_str(shape_));
  Tensor t = *this;
  int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  t.shape_[0] = end - begin;
  t.data_ = static_cast<char*>(data_) + size_t(begin * row) * dtype_size(dtype_);
  return t;
}

void Tensor::fill_zero() {
  QT_ASSERT(device_ == Device::CPU, "fill_zero on {}", device_name(device_));
  if (data_) std::memset(data_, 0, nbytes());
}

}  // namespace qt
