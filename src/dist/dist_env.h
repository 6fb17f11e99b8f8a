// The process's place in a multi-process job, read from the environment the launchers set.
//
// Sources, first match wins (torchrun inside an srun allocation, mpirun inside Slurm both work):
//  1. torchrun / `qwentune train --gpus N` / by hand: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
//     MASTER_ADDR, MASTER_PORT. Any of RANK / WORLD_SIZE / LOCAL_RANK set selects this source.
//  2. Open MPI (mpirun): OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE; MASTER_ADDR and
//     MASTER_PORT must be exported by the user (`mpirun -x MASTER_ADDR -x MASTER_PORT`).
//  3. Slurm (srun): SLURM_PROCID, SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), SLURM_LOCALID and the tasks
//     of this node from SLURM_NTASKS_PER_NODE or SLURM_STEP_TASKS_PER_NODE ("4(x2),3" with SLURM_NODEID).
//     The first host of SLURM_JOB_NODELIST cannot be expanded without scontrol, so MASTER_ADDR (and
//     MASTER_PORT) are required too.
//  Nothing set, or a world of 1: a single process (rank 0 of 1, no rendezvous).
// Every inconsistency (a rank outside the world, half a torchrun setting, a bad number, a world of
// several processes without MASTER_ADDR/MASTER_PORT) is a user error: qt::fail("dist", ...).
// LOCAL_RANK picks the GPU (CUDA_VISIBLE_DEVICES is honoured, so local rank r uses the r-th visible device).
#pragma once
#include <functional>
#include <map>
#include <optional>
#include <string>

namespace qt::dist {

struct DistEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 1;
  std::string master_addr;  // empty for a single process
  int master_port = 0;      // 0 for a single process
  std::string source = "single";  // "single", "torchrun", "openmpi", "slurm"

  bool distributed() const { return world_size > 1; }
  bool is_rank0() const { return rank == 0; }
  // "rank 2 of 8 (local 2 of 4), master 10.0.0.1:29500, from torchrun" or "single process".
  std::string describe() const;
};

// The environment lookup: the value of a variable, or nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

// Reads the process environment (::getenv).
DistEnv read_dist_env();
// The same rules over any lookup (tests).
DistEnv read_dist_env(const EnvLookup& env);
// A lookup over a fixed map (tests, and the launcher's own checks).
EnvLookup env_from_map(std::map<std::string, std::string> vars);

}  // namespace qt::dist
