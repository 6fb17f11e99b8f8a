// Joins the NCCL communicator of a job that met through the rendezvous: rank 0's ncclUniqueId is
// broadcast to every rank, which then initialises its communicator on `device` (its LOCAL_RANK).
// Header-only: the rendezvous lives in qwentune_lib, NCCL in qwentune_cuda.
#pragma once
#include <algorithm>
#include <memory>

#include "core/error.h"
#include "dist/nccl_comm.h"
#include "dist/rendezvous.h"

namespace qt::dist {

inline std::unique_ptr<NcclComm> nccl_from_rendezvous(Rendezvous& rv, int device) {
  NcclId id{};
  if (rv.rank() == 0) id = nccl_unique_id();
  const std::string blob = rv.broadcast(std::string(id.begin(), id.end()));
  QT_ASSERT(blob.size() == id.size(), "ncclUniqueId of {} bytes", blob.size());
  std::copy(blob.begin(), blob.end(), id.begin());
  return std::make_unique<NcclComm>(rv.rank(), rv.world_size(), id, device);
}

}  // namespace qt::dist
