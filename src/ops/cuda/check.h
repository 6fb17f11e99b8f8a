// Error checks for the CUDA backend. A failing CUDA or cuBLAS call, or a broken invariant inside
// the backend, is an internal error: print file:line and the library's message, then abort (the
// same tier as QT_ASSERT; this header has no dependency on fmt so nvcc-compiled files stay light).
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace qt::cuda {

[[noreturn]] inline void abort_cuda(const char* file, int line, const char* what, const char* msg) {
  std::fprintf(stderr, "%s:%d: CUDA backend error: %s: %s\n", file, line, what, msg);
  std::fflush(stderr);
  std::abort();
}

}  // namespace qt::cuda

#define QT_CUDA_CHECK(call)                                                         \
  do {                                                                              \
    cudaError_t qt_err_ = (call);                                                   \
    if (qt_err_ != cudaSuccess)                                                     \
      ::qt::cuda::abort_cuda(__FILE__, __LINE__, #call, cudaGetErrorString(qt_err_)); \
  } while (0)

#define QT_CUBLAS_CHECK(call)                                                             \
  do {                                                                                    \
    cublasStatus_t qt_st_ = (call);                                                       \
    if (qt_st_ != CUBLAS_STATUS_SUCCESS)                                                  \
      ::qt::cuda::abort_cuda(__FILE__, __LINE__, #call, cublasLtGetStatusString(qt_st_)); \
  } while (0)

// After a kernel launch: catches bad launch configurations at once (asynchronous faults surface at
// the next synchronising call).
#define QT_CUDA_LAUNCH_CHECK() QT_CUDA_CHECK(cudaGetLastError())

#define QT_CUDA_ASSERT(cond, msg)                                       \
  do {                                                                  \
    if (!(cond)) ::qt::cuda::abort_cuda(__FILE__, __LINE__, #cond, msg); \
  } while (0)
