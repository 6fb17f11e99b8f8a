// NCCL communicator for data-parallel LoRA training (built only with -DQT_CUDA=ON, part of
// qwentune_cuda, linked with libnccl).
//
// Set-up: rank 0 creates the ncclUniqueId (128 bytes), the rendezvous broadcasts it, and every
// rank calls ncclCommInitRank on its GPU (nccl_from_rendezvous below). The trainer then sums fp32
// gradient ranges over all ranks with all_reduce_sum (in place, asynchronous on a stream; the
// trainer scales by 1/N itself) and waits with synchronize(), which also watches for NCCL's
// asynchronous errors (a peer that died leaves collectives hanging) and a timeout.
// Errors: a failing NCCL call aborts the communicator (ncclCommAbort: pending collectives return)
// and throws qt::Error "[nccl] file:line: call: reason" so the process exits with one line and the
// launcher stops the other ranks. CUDA errors abort (QT_CUDA_CHECK), as in the rest of the backend.
#pragma once
#include <cuda_runtime.h>
#include <nccl.h>

#include <array>
#include <cstddef>
#include <memory>
#include <string>

namespace qt::dist {

using NcclId = std::array<char, NCCL_UNIQUE_ID_BYTES>;

NcclId nccl_unique_id();   // on rank 0 only
std::string nccl_version();  // "2.28.3" (of the library loaded at run time)

class NcclComm {
 public:
  // Makes `device` current and joins the communicator (blocks until all ranks joined).
  NcclComm(int rank, int world_size, const NcclId& id, int device);
  ~NcclComm();  // ncclCommDestroy (nothing after abort())
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_; }
  int device() const { return device_; }
  ncclComm_t get() const { return comm_; }

  // data[0, count) := the sum over all ranks of their data[0, count), in place, enqueued on `stream`.
  void all_reduce_sum(float* data, size_t count, cudaStream_t stream);
  void all_reduce_sum(double* data, size_t count, cudaStream_t stream);
  // Waits for `stream`, polling NCCL's asynchronous error state; throws (after abort) on an error
  // or when the stream has not finished after timeout_s (a peer died or hangs).
  void synchronize(cudaStream_t stream, double timeout_s);
  // Aborts the communicator: pending collectives return, later calls are refused.
  void abort();

 private:
  void all_reduce_sum(void* data, size_t count, ncclDataType_t type, cudaStream_t stream);
  [[noreturn]] void fail_call(const char* file, int line, const char* call, ncclResult_t r);
  int rank_ = 0, world_ = 1, device_ = 0;
  ncclComm_t comm_ = nullptr;
};

}  // namespace qt::dist
