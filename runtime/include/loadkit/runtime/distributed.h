#pragma once
/// \file
/// Ranks over c10d, torch.distributed's C++ core: the rendezvous (TCPStore),
/// the tensor-parallel process group (Gloo on the CPU, NCCL on CUDA, one GPU
/// per rank) and the local launcher behind `--tp-size N`.
///
/// A rank finds its group the way torchrun tells it: RANK, WORLD_SIZE,
/// LOCAL_RANK, MASTER_ADDR, MASTER_PORT (and TORCHELASTIC_USE_AGENT_STORE when
/// the launcher hosts the store). Nothing here hangs for ever: collectives and
/// waits time out after LOADKIT_TP_TIMEOUT seconds (default 300).

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace loadkit {

class TensorParallelGroup;

/// What torchrun (or `launch_local_ranks`) put in the environment.
struct RankEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  bool agent_store = false;  ///< the launcher hosts the store; every rank is its client
  bool local_launch = false; ///< started by `launch_local_ranks`: failures go to the launcher, not stderr

  /// Null when WORLD_SIZE is not set; Usage error naming the variable when one is malformed.
  static std::optional<RankEnv> from_environment();
};

/// LOADKIT_TP_TIMEOUT (seconds), default 300.
std::chrono::milliseconds collective_timeout();

/// Whether this build can run tensor parallelism on `device_type` ("cpu", "cuda"); if not, why.
std::optional<std::string> tp_unavailable_reason(const std::string& device_type);

/// This process's place among the ranks of one job: the store they share and
/// the tensor-parallel process group over it.
class RankGroup {
 public:
  /// Joins the group `env` describes; `device` is the model's device ("cpu",
  /// "cuda:N"), which picks the backend. Blocks until every rank has joined
  /// (or the timeout passes: Other error).
  static std::unique_ptr<RankGroup> join(const RankEnv& env, const std::string& device);
  ~RankGroup();

  int rank() const;
  int size() const;
  /// For ModelContext::tp_group.
  std::shared_ptr<TensorParallelGroup> tp_group() const;

  /// Runs one step of a job on every rank: `fn` returns this rank's payload;
  /// once every rank has finished the step, returns all payloads in rank
  /// order. When `fn` throws here, the error is published before it is
  /// rethrown; when another rank failed the step, this throws that rank's
  /// error (same kind, "rank N: <message>") on this rank too — no rank goes on
  /// into a collective that could never complete.
  std::vector<std::string> step(const std::string& name, const std::function<std::string()>& fn);

  /// Tells the launcher why this rank is about to exit (exit code + one line).
  void publish_failure(int exit_code, const std::string& message);

 private:
  struct Impl;
  explicit RankGroup(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Thrown on a rank when another rank failed a step (already reported there).
bool is_other_rank_failure(const std::exception& e);

/// Starts `n` ranks of this very command (/proc/self/exe with the same
/// arguments) with torchrun's environment, hosting their store; rank 0's
/// stdout is kept, the others' discarded. Returns 0 when every rank exits 0.
/// When one fails, the others are killed at once and a loadkit::Error with
/// that rank's message and exit code is thrown.
int launch_local_ranks(int n);

}  // namespace loadkit
