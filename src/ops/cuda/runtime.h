// RAII owners for the CUDA backend: device buffers, streams, events, and the per-stream Context
// (stream + cuBLASLt handle + its workspace) that every op of ops/cuda/ops.h takes.
// Moves transfer ownership; copies are deleted. Every call is checked (QT_CUDA_CHECK aborts).
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ops/cuda/check.h"

namespace qt::cuda {

using bf16 = __nv_bfloat16;

// Number of visible CUDA devices; 0 (never an abort) when there is no driver or no GPU.
int device_count();
// The name of the current device (cudaGetDeviceProperties), e.g. "NVIDIA H100 80GB HBM3".
std::string current_device_name();

// n elements of T in device memory (cudaMalloc: 256-byte aligned). Contents start undefined.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n) : n_(n) {
    if (n > 0) QT_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  Buffer(Buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { release(); }

  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

  // Synchronous copies (the null stream; tests and setup only). A pageable host-to-device
  // cudaMemcpy may return before its DMA has landed, and the ops run on non-blocking streams that
  // do not wait for the null stream: the device synchronisation makes the data visible to them.
  // (Without it, kernels queued right after an upload read partly stale weights now and then.)
  void upload(const T* host, size_t n) {
    QT_CUDA_ASSERT(n <= n_, "upload larger than the buffer");
    if (!n) return;
    QT_CUDA_CHECK(cudaMemcpy(p_, host, n * sizeof(T), cudaMemcpyHostToDevice));
    QT_CUDA_CHECK(cudaDeviceSynchronize());
  }
  void upload(const std::vector<T>& host) { upload(host.data(), host.size()); }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_) QT_CUDA_CHECK(cudaMemcpy(host.data(), p_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }
  // Synchronous fill (cudaMemset is asynchronous to the host: completed before returning, see upload).
  void fill_bytes(int byte) {
    if (!n_) return;
    QT_CUDA_CHECK(cudaMemset(p_, byte, bytes()));
    QT_CUDA_CHECK(cudaDeviceSynchronize());
  }

 private:
  void release() {
    if (p_) cudaFree(p_);  // errors at teardown are ignored (the context may already be gone)
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

template <typename T>
Buffer<T> to_device(const std::vector<T>& host) {
  Buffer<T> b(host.size());
  b.upload(host);
  return b;
}

// n elements of T in page-locked host memory (cudaMallocHost), for asynchronous uploads: the
// contents must stay unchanged until the copies reading them have run (an Event tells when).
template <typename T>
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  // mapped: also readable and writable by kernels through device_ptr() (zero-copy over the bus).
  explicit PinnedBuffer(size_t n, bool mapped = false) : n_(n) {
    if (n == 0) return;
    if (mapped)
      QT_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&p_), n * sizeof(T), cudaHostAllocMapped | cudaHostAllocPortable));
    else
      QT_CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&p_), n * sizeof(T)));
  }
  // The address kernels use for a mapped buffer.
  T* device_ptr() const {
    if (!p_) return nullptr;
    void* d = nullptr;
    QT_CUDA_CHECK(cudaHostGetDevicePointer(&d, p_, 0));
    return static_cast<T*>(d);
  }
  PinnedBuffer(PinnedBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { release(); }
  T* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  void release() {
    if (p_) cudaFreeHost(p_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  size_t n_ = 0;
};

class Stream {
 public:
  Stream() { QT_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() { cudaStreamDestroy(s_); }
  cudaStream_t get() const { return s_; }
  void synchronize() const { QT_CUDA_CHECK(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { QT_CUDA_CHECK(cudaEventCreate(&e_)); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() { cudaEventDestroy(e_); }
  cudaEvent_t get() const { return e_; }
  void record(cudaStream_t s) { QT_CUDA_CHECK(cudaEventRecord(e_, s)); }
  void synchronize() const { QT_CUDA_CHECK(cudaEventSynchronize(e_)); }
  // Milliseconds from `start` to this event (both recorded and complete).
  float elapsed_since(const Event& start) const {
    float ms = 0;
    QT_CUDA_CHECK(cudaEventElapsedTime(&ms, start.e_, e_));
    return ms;
  }

 private:
  cudaEvent_t e_ = nullptr;
};

// What every op needs: the stream it runs on, a cuBLASLt handle and the GEMM workspace. One
// Context per stream; ops on one Context run in order. Not thread safe.
class Context {
 public:
  static constexpr size_t kWorkspaceBytes = size_t(32) << 20;  // cuBLASLt's recommendation for Hopper
  Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  ~Context();

  cudaStream_t stream() const { return stream_.get(); }
  cublasLtHandle_t lt() const { return lt_; }
  void* workspace() const { return workspace_.get(); }
  size_t workspace_bytes() const { return workspace_.bytes(); }
  void synchronize() const { stream_.synchronize(); }
  // A scratch buffer of at least n bytes owned by the context, reused across calls: valid until
  // the next scratch() call of a larger size. Ops use it for small temporaries (stream ordered).
  void* scratch(size_t bytes);
  // A second scratch, for gemm()'s fp32 staging, so a GEMM never invalidates an op's scratch.
  void* gemm_scratch(size_t bytes);
  int sm_count() const { return sm_count_; }
  size_t max_smem_per_block() const { return max_smem_; }

 private:
  Stream stream_;
  cublasLtHandle_t lt_ = nullptr;
  Buffer<unsigned char> workspace_;
  Buffer<unsigned char> scratch_, gemm_scratch_;
  int sm_count_ = 0;
  size_t max_smem_ = 0;
};

}  // namespace qt::cuda
