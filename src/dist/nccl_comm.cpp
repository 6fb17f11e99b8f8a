// NCCL communicator, all-reduce and error handling (see nccl_comm.h). Messages are built without
// fmt: this file is part of qwentune_cuda, which does not link it.
#include "dist/nccl_comm.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "core/error.h"
#include "ops/cuda/check.h"

#define QT_NCCL_CHECK(call)                                               \
  do {                                                                    \
    const ncclResult_t qt_nccl_r_ = (call);                               \
    if (qt_nccl_r_ != ncclSuccess) fail_call(__FILE__, __LINE__, #call, qt_nccl_r_); \
  } while (0)

namespace qt::dist {

namespace {
[[noreturn]] void throw_nccl(const char* file, int line, const char* call, ncclResult_t r, const char* detail) {
  std::string msg = std::string("[nccl] ") + file + ":" + std::to_string(line) + ": " + call + ": " + ncclGetErrorString(r);
  if (detail && *detail) msg += std::string(" (") + detail + ")";
  if (r == ncclRemoteError || r == ncclSystemError) msg += "; another rank probably failed: see its output";
  throw Error(msg);
}
}  // namespace

NcclId nccl_unique_id() {
  ncclUniqueId id;
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) throw_nccl(__FILE__, __LINE__, "ncclGetUniqueId(&id)", r, ncclGetLastError(nullptr));
  NcclId out{};
  std::copy(id.internal, id.internal + NCCL_UNIQUE_ID_BYTES, out.begin());
  return out;
}

std::string nccl_version() {
  int v = 0;
  if (ncclGetVersion(&v) != ncclSuccess) return "unknown";
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." + std::to_string(v % 100);
}

NcclComm::NcclComm(int rank, int world_size, const NcclId& id, int device) : rank_(rank), world_(world_size), device_(device) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) {
    cudaGetLastError();
    devices = 0;
  }
  if (device < 0 || device >= devices)
    throw Error("[nccl] rank " + std::to_string(rank) + " wants GPU " + std::to_string(device) + " (its LOCAL_RANK) but " +
                std::to_string(devices) + " GPU(s) are visible (CUDA_VISIBLE_DEVICES?)");
  QT_CUDA_CHECK(cudaSetDevice(device));
  ncclUniqueId uid;
  std::copy(id.begin(), id.end(), uid.internal);
  QT_NCCL_CHECK(ncclCommInitRank(&comm_, world_size, uid, rank));
}

NcclComm::~NcclComm() {
  if (comm_) ncclCommDestroy(comm_);  // errors at teardown are ignored
}

void NcclComm::fail_call(const char* file, int line, const char* call, ncclResult_t r) {
  const std::string detail = comm_ ? ncclGetLastError(comm_) : ncclGetLastError(nullptr);
  abort();
  throw_nccl(file, line, call, r, detail.c_str());
}

void NcclComm::abort() {
  if (comm_) ncclCommAbort(comm_);
  comm_ = nullptr;
}

void NcclComm::all_reduce_sum(void* data, size_t count, ncclDataType_t type, cudaStream_t stream) {
  if (!comm_) throw Error("[nccl] all_reduce on an aborted communicator");
  if (count == 0) return;
  QT_NCCL_CHECK(ncclAllReduce(data, data, count, type, ncclSum, comm_, stream));
}

void NcclComm::all_reduce_sum(float* data, size_t count, cudaStream_t stream) {
  all_reduce_sum(data, count, ncclFloat32, stream);
}

void NcclComm::all_reduce_sum(double* data, size_t count, cudaStream_t stream) {
  all_reduce_sum(data, count, ncclFloat64, stream);
}

void NcclComm::synchronize(cudaStream_t stream, double timeout_s) {
  const auto start = std::chrono::steady_clock::now();
  for (int spins = 0;; ++spins) {
    const cudaError_t q = cudaStreamQuery(stream);
    if (q == cudaSuccess) return;
    if (q != cudaErrorNotReady) QT_CUDA_CHECK(q);
    if (comm_) {
      ncclResult_t async = ncclSuccess;
      QT_NCCL_CHECK(ncclCommGetAsyncError(comm_, &async));
      if (async != ncclSuccess) fail_call(__FILE__, __LINE__, "ncclCommGetAsyncError (asynchronous error)", async);
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > timeout_s) {
      abort();
      throw Error("[nccl] rank " + std::to_string(rank_) + ": a collective did not finish within " +
                  std::to_string(int(timeout_s)) + " s (a peer died or hangs); communicator aborted");
    }
    // Spin briefly (a step's last bucket usually lands within microseconds), then sleep.
    if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

}  // namespace qt::dist
