// Context and device queries (see runtime.h).
#include "ops/cuda/runtime.h"

#include <algorithm>

namespace qt::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later checks are not confused
    return 0;
  }
  return n;
}

std::string current_device_name() {
  int dev = 0;
  cudaDeviceProp prop{};
  QT_CUDA_CHECK(cudaGetDevice(&dev));
  QT_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  return prop.name;
}

Context::Context() : workspace_(kWorkspaceBytes) {
  QT_CUBLAS_CHECK(cublasLtCreate(&lt_));
  int dev = 0;
  QT_CUDA_CHECK(cudaGetDevice(&dev));
  QT_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, dev));
  int smem = 0;
  QT_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  max_smem_ = size_t(smem);
}

Context::~Context() {
  cudaStreamSynchronize(stream_.get());
  if (lt_) cublasLtDestroy(lt_);
}

namespace {
void* grow(Buffer<unsigned char>& buf, size_t bytes, cudaStream_t stream) {
  if (bytes > buf.bytes()) {
    // The old buffer may still be read by queued work: wait before freeing it.
    QT_CUDA_CHECK(cudaStreamSynchronize(stream));
    buf = Buffer<unsigned char>(bytes + std::min(bytes / 4, size_t(16) << 20));  // slack for slightly larger asks
  }
  return buf.get();
}
}  // namespace

void* Context::scratch(size_t bytes) { return grow(scratch_, bytes, stream_.get()); }
void* Context::gemm_scratch(size_t bytes) { return grow(gemm_scratch_, bytes, stream_.get()); }

}  // namespace qt::cuda
