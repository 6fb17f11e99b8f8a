// NCCL all-reduce for data-parallel training: one rank on one GPU, and two ranks (two processes
// started by the local launcher, one GPU each) meeting through the TCP rendezvous; plain ranges and
// the bucketed all-reduce overlapped with a (fake) backward, including a rank without micro-batches. Skipped without
// enough GPUs. On failure the worker prints the shapes, the worst element and its error.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "cli/commands/launch.h"
#include "cuda_parity.h"
#include "dist/dist_env.h"
#include "dist/nccl_grad_sync.h"
#include "dist/nccl_rendezvous.h"
#include "test_files.h"

namespace qt::dist {
namespace {

// The value rank r holds at index i: small multiples of 1/4, so sums over ranks are exact in fp32.
float value_at(int r, size_t i) { return float(r + 1) * float(int(i % 97) - 48) * 0.25f + float(r); }

// Element-wise check of `got` (the buffer after the all-reduces of [lo, hi)) against the exact sums
// inside the range and this rank's own values outside; prints the worst element on failure.
void expect_reduced(const std::vector<float>& got, int rank, int world, size_t lo, size_t hi) {
  size_t bad = 0, worst_i = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    double want = value_at(rank, i);
    if (i >= lo && i < hi) {
      want = 0;
      for (int r = 0; r < world; ++r) want += value_at(r, i);
    }
    const double err = std::fabs(double(got[i]) - want);
    if (err > 0) ++bad;
    if (err > worst) {
      worst = err;
      worst_i = i;
    }
  }
  EXPECT_EQ(bad, 0u) << "rank " << rank << " of " << world << ": " << bad << " of " << got.size()
                     << " elements wrong (reduced range [" << lo << ", " << hi << ")); worst at " << worst_i
                     << ": |error| " << worst;
}

// Fills a device buffer with this rank's values, all-reduces [lo, mid) and [mid, hi) as two buckets
// on a communication stream (the upper bucket first, as the backward releases them), and checks.
void run_all_reduce(NcclComm& comm, size_t n) {
  std::vector<float> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = value_at(comm.rank(), i);
  cuda::Buffer<float> buf(n);
  buf.upload(host);
  cuda::Stream comm_stream;
  const size_t lo = 5, hi = n - 7, mid = lo + (hi - lo) / 3;
  comm.all_reduce_sum(buf.get() + mid, hi - mid, comm_stream.get());
  comm.all_reduce_sum(buf.get() + lo, mid - lo, comm_stream.get());
  comm.synchronize(comm_stream.get(), 120);
  expect_reduced(buf.download(), comm.rank(), comm.world_size(), lo, hi);
}

// One optimizer step of bucketed all-reduce overlapped with a fake backward: layer j's gradients are
// scaled by 2 on the compute stream (after 40 slow no-op passes, so a missing dependency would let
// NCCL read stale values), then layer_done(j). `idle` ranks have no micro-batch (zero gradients,
// flush()). Expected: the exact sum over ranks of 2 x value (idle ranks contribute 0).
void run_bucketed_step(NcclComm& comm, const std::vector<bool>& idle) {
  const int layers = 6;
  std::vector<GradTensor> tensors;
  int64_t off = 0;
  for (int l = 0; l < layers; ++l)
    for (int64_t size : {4096, 12288, 777, 30000}) {
      tensors.push_back({off, size, l});
      off += size;
    }
  const auto plan = plan_grad_buckets(tensors, 64 << 10);
  const size_t n = size_t(off);
  const bool me_idle = idle[size_t(comm.rank())];
  std::vector<float> host(n, 0.0f);
  if (!me_idle)
    for (size_t i = 0; i < n; ++i) host[i] = value_at(comm.rank(), i);
  cuda::Buffer<float> buf(n);
  buf.upload(host);
  cuda::Context ctx;
  GradAllReducer sync(comm, buf.get(), plan);
  if (me_idle) {
    sync.flush(ctx.stream());
  } else {
    for (int l = layers - 1; l >= 0; --l) {
      const int64_t lo = tensors[size_t(l * 4)].offset, hi = tensors[size_t(l * 4 + 3)].offset + tensors[size_t(l * 4 + 3)].size;
      for (int rep = 0; rep < 40; ++rep) cuda::scale_inplace(ctx, buf.get() + lo, hi - lo, 1.0f);
      cuda::scale_inplace(ctx, buf.get() + lo, hi - lo, 2.0f);
      sync.layer_done(l, ctx.stream());
    }
  }
  EXPECT_EQ(sync.launched(), plan.size());
  sync.finish(ctx.stream());
  comm.synchronize(ctx.stream(), 120);
  const std::vector<float> got = buf.download();
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < n; ++i) {
    float want = 0;
    for (int r = 0; r < comm.world_size(); ++r)
      if (!idle[size_t(r)]) want += 2.0f * value_at(r, i);
    if (got[i] != want && bad++ == 0) first_bad = i;
  }
  EXPECT_EQ(bad, 0u) << "rank " << comm.rank() << ": " << bad << " of " << n << " elements wrong, " << plan.size()
                     << " buckets; first at " << first_bad << ": got " << got[first_bad];
}

TEST(CudaNccl, OneRank) {
  QT_SKIP_WITHOUT_GPU();
  std::printf("NCCL %s\n", nccl_version().c_str());
  Rendezvous rv(RendezvousOptions{});  // a world of one: no network
  auto comm = nccl_from_rendezvous(rv, 0);
  EXPECT_EQ(comm->world_size(), 1);
  run_all_reduce(*comm, (size_t(1) << 20) + 3);
  run_bucketed_step(*comm, {false});
  run_bucketed_step(*comm, {true});
  EXPECT_THROW(NcclComm(0, 1, nccl_unique_id(), cuda::device_count()), Error);  // no such GPU: a clear error
}

// Started twice by CudaNccl.TwoProcesses through the launcher (QT_NCCL_WORKER set); skipped otherwise.
TEST(CudaNcclWorker, AllReduceAcrossRanks) {
  if (!std::getenv("QT_NCCL_WORKER")) GTEST_SKIP() << "runs only as a rank of CudaNccl.TwoProcesses";
  const DistEnv env = read_dist_env();
  ASSERT_TRUE(env.distributed());
  RendezvousOptions o;
  o.rank = env.rank;
  o.world_size = env.world_size;
  o.master_addr = env.master_addr;
  o.master_port = env.master_port;
  o.connect_timeout_s = 60;
  o.op_timeout_s = 120;
  Rendezvous rv(o);
  rv.check_same("test settings", "n=1048579");
  auto comm = nccl_from_rendezvous(rv, env.local_rank);
  run_all_reduce(*comm, (size_t(1) << 20) + 3);
  run_bucketed_step(*comm, {false, false});
  run_bucketed_step(*comm, {false, true});  // a ragged tail step: rank 1 has no micro-batch
  // Bus bandwidth of a 256 MiB fp32 all-reduce (the size of a large LoRA gradient buffer).
  const size_t n = size_t(64) << 20;
  cuda::Buffer<float> big(n);
  big.fill_bytes(0);
  cuda::Stream s;
  comm->all_reduce_sum(big.get(), n, s.get());  // warm-up
  comm->synchronize(s.get(), 120);
  cuda::Event t0, t1;
  t0.record(s.get());
  const int iters = 10;
  for (int k = 0; k < iters; ++k) comm->all_reduce_sum(big.get(), n, s.get());
  t1.record(s.get());
  comm->synchronize(s.get(), 120);
  const double ms = t1.elapsed_since(t0) / iters;
  const double busbw = 2.0 * (env.world_size - 1) / env.world_size * double(n * 4) / (ms * 1e-3) / 1e9;
  std::printf("rank %d: all-reduce of 256 MiB over %d GPUs: %.3f ms, bus bandwidth %.1f GB/s\n", env.rank,
              env.world_size, ms, busbw);
  rv.shutdown();
}

TEST(CudaNccl, TwoProcesses) {
  QT_SKIP_WITHOUT_GPU();
  if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 GPUs, " << cuda::device_count() << " visible";
  test::TempDir dir("nccl");
  ::setenv("QT_NCCL_WORKER", "1", 1);
  cli::LaunchOptions o;
  o.nprocs = 2;
  o.exe = std::filesystem::read_symlink("/proc/self/exe").string();
  o.args = {"--gtest_filter=CudaNcclWorker.AllReduceAcrossRanks"};
  o.log_dir = dir.str();
  const int code = cli::launch_local_ranks(o);
  ::unsetenv("QT_NCCL_WORKER");
  std::printf("rank 1's output:\n%s", test::read_file(dir.path / "rank-1.log").c_str());
  EXPECT_EQ(code, 0) << "a rank failed (rank 0's output above, rank 1's log printed)";
}

}  // namespace
}  // namespace qt::dist
