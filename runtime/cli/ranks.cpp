#include "ranks.h"

#include <c10/util/Exception.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "device.h"
#include "output.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"

namespace loadkit::cli {

int Ranks::rank() const { return group_ ? group_->rank() : 0; }
int Ranks::size() const { return group_ ? group_->size() : 1; }

std::vector<std::string> Ranks::step(const std::string& name, const std::function<std::string()>& fn) {
  if (!group_) return {fn()};
  return group_->step(name, fn);
}

namespace {

/// The exit code and the one line a failure reports (as main() words them).
std::pair<int, std::string> describe(const std::exception& e) {
  if (auto* error = dynamic_cast<const Error*>(&e)) return {exit_code(error->kind()), error->what()};
  if (auto* c10 = dynamic_cast<const c10::Error*>(&e)) return {1, c10->what_without_backtrace()};
  if (dynamic_cast<const std::bad_alloc*>(&e)) return {1, "out of host memory"};
  return {1, e.what()};
}

/// CPUs this process may run on (taskset, cpusets), at least 1.
int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return std::max(1u, std::thread::hardware_concurrency());
}

/// Refuses, before any rank starts, a tensor-parallel size this host cannot run as local ranks.
/// CUDA: one GPU per rank. CPU: every rank is a whole process (its own libtorch, its shard, Gloo's
/// buffers), and ranks beyond the cores only time-slice; at
/// most max(usable CPUs, kMinCpuRanks) ranks, so that the usual sizes (2, 4, 8) still run on a
/// small machine (for tests of the sharding) and a typo (--tp-size 24 on 2 cores took 4.4 GB and
/// 17 s to fail) stops at once.
void check_local_ranks(int tp_size, const std::string& type) {
  constexpr int kMinCpuRanks = 8;
  if (type == "cuda") {
    const int gpus = device::cuda_device_count();
    if (tp_size > gpus)
      fail(ErrorKind::Usage, "--tp-size ", tp_size, ": each rank needs its own GPU but ", gpus,
           " CUDA device(s) are visible here", std::getenv("CUDA_VISIBLE_DEVICES") ? " (CUDA_VISIBLE_DEVICES is set)" : "");
    return;
  }
  const int cpus = usable_cpus(), limit = std::max(cpus, kMinCpuRanks);
  if (tp_size > limit)
    fail(ErrorKind::Usage, "--tp-size ", tp_size, ": at most ", limit, " CPU ranks on this machine (", cpus,
         " usable CPUs; each rank is a process of its own)");
}

}  // namespace

int run_on_ranks(CommonOptions& common, const std::function<int(Ranks&)>& body) {
  LoadOptions& load = common.load;
  const auto env = RankEnv::from_environment();
  if (!env || env->world_size == 1) {
    if (load.tp_size == 1) {
      Ranks one;
      return body(one);
    }
    const std::string type = load.device.rfind("cuda", 0) == 0 ? "cuda" : "cpu";
    if (auto why = tp_unavailable_reason(type)) fail(ErrorKind::Usage, "--tp-size ", load.tp_size, ": ", *why);
    check_local_ranks(load.tp_size, type);
    return launch_local_ranks(load.tp_size);
  }
  if (env->world_size != load.tp_size)
    fail(ErrorKind::Usage, "--tp-size ", load.tp_size, " differs from WORLD_SIZE=", env->world_size,
         " (one tensor-parallel group per job)");
  if (env->rank > 0 && !env->local_launch) std::freopen("/dev/null", "w", stdout);  // rank 0 writes the outputs
  if (load.device == "cuda") load.device = "cuda:" + std::to_string(env->local_rank);  // one GPU per rank
  load.tp_rank = env->rank;

  std::unique_ptr<RankGroup> group;
  try {
    group = RankGroup::join(*env, load.device);
    // Test hook: a rank that dies without a word, after the others have joined.
    if (const char* abort_rank = std::getenv("LOADKIT_TEST_ABORT_RANK"); abort_rank && std::atoi(abort_rank) == env->rank)
      std::abort();
    load.tp_group = group->tp_group();
    load.rank_group = group->world();
    Ranks ranks(group.get());
    return body(ranks);
  } catch (const std::exception& e) {
    const auto [code, message] = describe(e);
    if (already_reported(e)) {
      // The failing rank (or, for a join failure, the store) has it; under the local launcher,
      // which reports it, once is enough.
      if (env->local_launch) return code;
      throw;
    }
    if (group) {
      group->publish_failure(code, message);
      if (env->local_launch) return code;  // the launcher prints it
    }
    throw;
  }
}

std::string timing_payload(const LoadReport& report) {
  std::ostringstream out;
  out.precision(17);
  out << report.bytes << " " << report.seconds << " " << report.bytes_read;
  return out.str();
}

std::string report_json(const LoadReport& report, const std::vector<std::string>& timings) {
  if (timings.size() <= 1) return report.to_json();
  auto j = nlohmann::ordered_json::parse(report.to_json());
  j["tp_size"] = timings.size();
  nlohmann::ordered_json ranks = nlohmann::ordered_json::array();
  for (size_t r = 0; r < timings.size(); ++r) {
    std::istringstream in(timings[r]);
    uint64_t bytes = 0, bytes_read = 0;
    double seconds = 0;
    in >> bytes >> seconds >> bytes_read;
    ranks.push_back({{"rank", r},
                     {"bytes", bytes},
                     {"bytes_read", bytes_read},
                     {"seconds", seconds},
                     {"gb_per_s", seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0.0}});
  }
  j["ranks"] = ranks;
  return json_text(j);
}

}  // namespace loadkit::cli
