// Rank, world and master address from torchrun / Open MPI / Slurm variables (see dist_env.h).
#include "dist/dist_env.h"

#include <charconv>
#include <cstdlib>
#include <vector>

#include <fmt/format.h>

#include "core/error.h"

namespace qt::dist {
namespace {

// A whole decimal integer in [lo, hi], or a "[dist] NAME=..." error.
int parse_int(const std::string& name, const std::string& value, int lo, int hi) {
  int v = 0;
  const char* end = value.data() + value.size();
  const auto [p, ec] = std::from_chars(value.data(), end, v);
  if (value.empty() || ec != std::errc() || p != end)
    fail("dist", "{}=\"{}\": not an integer", name, value);
  if (v < lo || v > hi) fail("dist", "{}={}: must be in [{}, {}]", name, v, lo, hi);
  return v;
}

int need_int(const EnvLookup& env, const std::string& name, int lo, int hi, const std::string& why) {
  const auto v = env(name);
  if (!v) fail("dist", "{} is not set ({})", name, why);
  return parse_int(name, *v, lo, hi);
}

std::optional<int> opt_int(const EnvLookup& env, const std::string& name, int lo, int hi) {
  const auto v = env(name);
  if (!v) return std::nullopt;
  return parse_int(name, *v, lo, hi);
}

// Slurm's compressed per-node task counts, "2(x3),1" -> {2, 2, 2, 1}.
std::vector<int> expand_tasks_per_node(const std::string& name, const std::string& s) {
  std::vector<int> out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t comma = s.find(',', i);
    if (comma == std::string::npos) comma = s.size();
    const std::string item = s.substr(i, comma - i);
    int count = 0, repeat = 1;
    const size_t paren = item.find('(');
    if (paren == std::string::npos) {
      count = parse_int(name, item, 1, 1 << 20);
    } else {
      if (item.size() < paren + 4 || item.compare(paren, 2, "(x") != 0 || item.back() != ')')
        fail("dist", "{}=\"{}\": expected entries like 4 or 4(x2)", name, s);
      count = parse_int(name, item.substr(0, paren), 1, 1 << 20);
      repeat = parse_int(name, item.substr(paren + 2, item.size() - paren - 3), 1, 1 << 20);
    }
    out.insert(out.end(), size_t(repeat), count);
    i = comma + 1;
  }
  return out;
}

void read_master(const EnvLookup& env, DistEnv& d, const std::string& hint) {
  const auto addr = env("MASTER_ADDR");
  const auto port = env("MASTER_PORT");
  if (!addr || addr->empty() || !port)
    fail("dist", "{} processes ({}) need MASTER_ADDR and MASTER_PORT: the host and a free TCP port of rank 0{}",
         d.world_size, d.source, hint);
  d.master_addr = *addr;
  d.master_port = parse_int("MASTER_PORT", *port, 1, 65535);
}

// The rank and world size from a pair of variables, the rank below the world size.
void read_rank_and_world(const EnvLookup& env, DistEnv& d, const std::string& rank_var, const std::string& world_var,
                         const std::string& why) {
  d.world_size = need_int(env, world_var, 1, 1 << 20, why);
  d.rank = need_int(env, rank_var, 0, 1 << 20, why);
  if (d.rank >= d.world_size) fail("dist", "{}={} is not below {}={}", rank_var, d.rank, world_var, d.world_size);
}

DistEnv from_torchrun(const EnvLookup& env) {
  DistEnv d;
  d.source = "torchrun";
  const std::string why = "RANK, WORLD_SIZE and LOCAL_RANK go together, as torchrun sets them";
  read_rank_and_world(env, d, "RANK", "WORLD_SIZE", why);
  if (d.world_size == 1 && !env("LOCAL_RANK")) return d;
  d.local_rank = need_int(env, "LOCAL_RANK", 0, 1 << 20, why);
  d.local_world_size = opt_int(env, "LOCAL_WORLD_SIZE", 1, 1 << 20).value_or(d.world_size);
  return d;
}

DistEnv from_openmpi(const EnvLookup& env) {
  DistEnv d;
  d.source = "openmpi";
  const std::string why = "mpirun sets OMPI_COMM_WORLD_RANK and OMPI_COMM_WORLD_SIZE together";
  read_rank_and_world(env, d, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", why);
  d.local_rank = opt_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0, 1 << 20).value_or(0);
  d.local_world_size = opt_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, 1 << 20).value_or(d.world_size);
  return d;
}

DistEnv from_slurm(const EnvLookup& env) {
  DistEnv d;
  d.source = "slurm";
  // Inside srun the step's task count; in a batch script only SLURM_NTASKS (of the allocation).
  const char* ntasks = env("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
  read_rank_and_world(env, d, "SLURM_PROCID", ntasks, "srun sets it with SLURM_PROCID");
  if (d.world_size == 1) return d;
  d.local_rank = need_int(env, "SLURM_LOCALID", 0, 1 << 20, "srun sets it with SLURM_PROCID");
  if (const auto per = env("SLURM_NTASKS_PER_NODE")) {
    d.local_world_size = parse_int("SLURM_NTASKS_PER_NODE", *per, 1, 1 << 20);
  } else if (const auto list = env("SLURM_STEP_TASKS_PER_NODE")) {
    const std::vector<int> per_node = expand_tasks_per_node("SLURM_STEP_TASKS_PER_NODE", *list);
    const int node = per_node.size() == 1 ? 0 : need_int(env, "SLURM_NODEID", 0, 1 << 20, "to index SLURM_STEP_TASKS_PER_NODE");
    if (size_t(node) >= per_node.size())
      fail("dist", "SLURM_NODEID={} but SLURM_STEP_TASKS_PER_NODE=\"{}\" lists {} node(s)", node, *list, per_node.size());
    d.local_world_size = per_node[size_t(node)];
  } else {
    d.local_world_size = d.world_size;
  }
  return d;
}

}  // namespace

std::string DistEnv::describe() const {
  if (!distributed()) return "single process";
  return fmt::format("rank {} of {} (local {} of {}), master {}:{}, from {}", rank, world_size, local_rank,
                     local_world_size, master_addr, master_port, source);
}

EnvLookup env_from_map(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& k) -> std::optional<std::string> {
    const auto it = vars.find(k);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

DistEnv read_dist_env() {
  return read_dist_env([](const std::string& k) -> std::optional<std::string> {
    const char* v = std::getenv(k.c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  });
}

DistEnv read_dist_env(const EnvLookup& env) {
  DistEnv d;
  std::string hint;
  if (env("RANK") || env("WORLD_SIZE") || env("LOCAL_RANK")) {
    d = from_torchrun(env);
  } else if (env("OMPI_COMM_WORLD_RANK") || env("OMPI_COMM_WORLD_SIZE")) {
    d = from_openmpi(env);
    hint = " (export them to every rank: mpirun -x MASTER_ADDR -x MASTER_PORT)";
  } else if (env("SLURM_PROCID")) {
    d = from_slurm(env);
    hint = " (Slurm: MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1))";
  } else {
    return d;
  }
  if (!d.distributed()) return DistEnv{};  // a world of one: nothing to coordinate
  if (d.local_world_size > d.world_size)
    fail("dist", "{} processes on this node exceed the {} of the whole job ({})", d.local_world_size, d.world_size, d.source);
  if (d.local_rank >= d.local_world_size)
    fail("dist", "local rank {} is not below the {} processes of this node ({})", d.local_rank, d.local_world_size, d.source);
  read_master(env, d, hint);
  return d;
}

}  // namespace qt::dist
