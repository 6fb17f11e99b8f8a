// Tensor: a contiguous, row-major n-d array with a dtype and a device tag.
// Storage is reference counted (shared_ptr) so views of a memory-mapped file keep the mapping
// alive. Only the CPU device is implemented in this file; CUDA buffers arrive with src/ops/cuda.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace qt {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

class Tensor {
 public:
  Tensor() = default;

  // Fresh CPU buffer, 64-byte aligned. zeros() clears it; empty() leaves it uninitialised.
  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::CPU);
  // Wraps memory owned elsewhere; `keepalive` is held as long as any copy of the tensor lives.
  static Tensor view_of(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> keepalive,
                        Device device = Device::CPU);
  template <typename T>
  static Tensor from_vector(const std::vector<T>& v, const Shape& shape);

  bool defined() const { return data_ != nullptr || storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? i + ndim() : i); }
  int ndim() const { return int(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  template <typename T> T* data() {
    QT_ASSERT(dtype_ == dtype_of<T>(), "tensor is {}, accessed as {}", dtype_name(dtype_), dtype_name(dtype_of<T>()));
    return static_cast<T*>(data_);
  }
  template <typename T> const T* data() const {
    QT_ASSERT(dtype_ == dtype_of<T>(), "tensor is {}, accessed as {}", dtype_name(dtype_), dtype_name(dtype_of<T>()));
    return static_cast<const T*>(data_);
  }

  Tensor reshape(const Shape& shape) const;  // same storage, same numel
  Tensor to(DType dtype) const;              // new buffer (a copy even when dtype is equal)
  Tensor clone() const { return to(dtype_); }
  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  void fill_zero();

 private:
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  void* data_ = nullptr;
  std::shared_ptr<void> storage_;
};

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& v, const Shape& shape) {
  QT_ASSERT(int64_t(v.size()) == shape_numel(shape), "from_vector: {} values for shape {}", v.size(), shape_str(shape));
  Tensor t = empty(shape, dtype_of<T>());
  std::copy(v.begin(), v.end(), t.data<T>());
  return t;
}

}  // namespace qt
