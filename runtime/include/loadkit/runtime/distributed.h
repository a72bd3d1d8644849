#pragma once
/// \file
/// Ranks over c10d, torch.distributed's C++ core: the rendezvous (TCPStore),
/// the tensor-parallel process group (Gloo on the CPU, NCCL on CUDA, one GPU
/// per rank), further groups over some of the ranks (weight sync: trainers,
/// a sender and its receivers) and the local launcher behind `--tp-size N`.
///
/// A rank finds its group the way torchrun tells it: RANK, WORLD_SIZE,
/// LOCAL_RANK, MASTER_ADDR, MASTER_PORT (and TORCHELASTIC_USE_AGENT_STORE when
/// the launcher hosts the store). Nothing here hangs for ever: collectives and
/// waits time out after LOADKIT_TP_TIMEOUT seconds (default 300).

#include <c10/core/Device.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace at {
class Tensor;
}

namespace loadkit {

enum class ErrorKind;
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

/// A c10d process group of the runtime's own, over some of the ranks of one
/// RankGroup (which made it): broadcast and all-gather as asynchronous work,
/// and a string exchange through the shared store. Not the plugins'
/// TensorParallelGroup (that is the plugin ABI); `tensor_parallel()` gives
/// this group in that form for ModelContext::tp_group.
///
/// Every member must call the same collectives in the same order. Tensors
/// live on `device()` (CPU for Gloo, this rank's GPU for NCCL), contiguous.
/// A collective that fails or outlasts LOADKIT_TP_TIMEOUT throws an Other
/// error on wait() naming the group and what was being sent, never hangs.
class ProcessGroup {
 public:
  /// An asynchronous collective; wait() before reading (or reusing) its tensors.
  class Pending {
   public:
    Pending();
    ~Pending();
    Pending(Pending&&) noexcept;
    Pending& operator=(Pending&&) noexcept;
    /// Blocks until the collective is complete (on NCCL: until the current
    /// CUDA stream is ordered after it). Throws once; later calls return.
    void wait();
    bool valid() const;

   private:
    friend class ProcessGroup;
    struct State;
    std::unique_ptr<State> state_;
  };

  ~ProcessGroup();
  const std::string& name() const;  ///< for messages, e.g. "sync"
  int rank() const;                 ///< this process's rank in the group
  int size() const;
  c10::Device device() const;
  /// This group's rank of a RankGroup rank (for messages).
  int global_rank(int group_rank) const;

  /// Starts sending `tensor` from group rank `root` into every member's `tensor` (same bytes size
  /// everywhere). `what` names the transfer in error messages ("bucket 3 of 7").
  Pending broadcast(at::Tensor& tensor, int root, const std::string& what);
  /// Starts gathering every member's `input` (same shape everywhere) into `output`, which is
  /// [size * input.size(0), ...]: member r's rows at r * input.size(0).
  Pending all_gather(at::Tensor& output, at::Tensor& input, const std::string& what);
  /// Every member's `payload` in rank order, through the store (no device memory, any size).
  /// Collective like the others; a member that does not arrive within the timeout is an Other
  /// error. `decisive`, when given, ends the wait as soon as one arrived payload (this member's
  /// own included) satisfies it; members not heard from by then have "" — so a member that
  /// failed can publish its verdict and leave, and the others learn it at once.
  std::vector<std::string> exchange(const std::string& payload,
                                    const std::function<bool(const std::string&)>& decisive = {});
  /// This group as the plugins see a tensor-parallel group.
  std::shared_ptr<TensorParallelGroup> tensor_parallel();

 private:
  friend class RankGroup;
  struct Impl;
  explicit ProcessGroup(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;  // shared with tensor_parallel()'s view
};

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
  /// The group of every rank (what tp_group() runs on).
  std::shared_ptr<ProcessGroup> world() const;
  /// A further group over `ranks` (RankGroup ranks, in group-rank order; this rank must be one
  /// of them), on this rank's device, its own store prefix `name`. Only the members call it;
  /// each member must pass the same `name` and `ranks`. Blocks until they all have.
  std::shared_ptr<ProcessGroup> new_group(const std::string& name, const std::vector<int>& ranks);

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

/// Whether `e` was reported already and must not be again by this rank: another rank's failure
/// of a step (that rank reported it), or, under the local launcher, this rank's failure to join
/// the group (published for the launcher, which reports it unless a rank failed of its own).
bool already_reported(const std::exception& e);

/// The error kind behind an exit code another rank reported (anything unknown is Other).
ErrorKind error_kind(int exit_code);

/// One line from any exception, as ranks pass failures on: loadkit's message, c10's without
/// its backtrace, line breaks folded into spaces.
std::string failure_message(const std::exception& e);

/// Starts `n` ranks of this very command (/proc/self/exe with the same
/// arguments) with torchrun's environment, hosting their store; rank 0's
/// stdout is kept, the others' discarded. Returns 0 when every rank exits 0.
/// When one fails, the others are killed at once and a loadkit::Error with
/// that rank's message and exit code is thrown.
int launch_local_ranks(int n);

}  // namespace loadkit
