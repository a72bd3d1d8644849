// The tensor-parallel process group over c10d: TCPStore rendezvous, Gloo on
// the CPU, NCCL on CUDA, and the store-based step agreement that lets every
// rank stop with the failing rank's error instead of waiting in a collective.

#include <ATen/ATen.h>
#include <c10/util/Logging.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if LOADKIT_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if LOADKIT_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <set>
#include <string_view>
#include <thread>

#include "loadkit/error.h"
#include "loadkit/model_context.h"
#include "loadkit/runtime/distributed.h"

namespace loadkit {

namespace {

using Clock = std::chrono::steady_clock;

int env_int(const char* name, int fallback) {
  const char* text = std::getenv(name);
  if (!text || !*text) return fallback;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < 0 || value > 1'000'000)
    fail(ErrorKind::Usage, "environment variable ", name, "='", text, "' is not a non-negative integer");
  return static_cast<int>(value);
}

std::string env_str(const char* name, const std::string& fallback) {
  const char* text = std::getenv(name);
  return text && *text ? std::string(text) : fallback;
}

/// A step's status in the store: "ok\n<payload>" or "fail\n<exit code>\n<message>".
std::string step_key(const std::string& step, int rank) { return cat("loadkit/step/", step, "/", rank); }
std::string failure_key(int rank) { return cat("loadkit/failed/", rank); }
std::string join_failure_key(int rank) { return cat("loadkit/join_failed/", rank); }

/// A failure reported already, not to be reported again by this rank: another rank's failure
/// of a step, rethrown here (that rank reported it), or this rank's failure to join the group,
/// published in the store for the launcher.
class ReportedFailure : public Error {
 public:
  using Error::Error;
};

std::string to_string(const std::vector<uint8_t>& bytes) { return std::string(bytes.begin(), bytes.end()); }

/// A c10d backend over `store` for `rank` of `size` on `device` (Gloo on the CPU, NCCL on CUDA).
c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                               const c10::Device& device, std::chrono::milliseconds timeout) {
  if (device.is_cuda()) {
#if LOADKIT_NCCL
    auto nccl = c10d::ProcessGroupNCCL::Options::create();
    nccl->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, nccl);
#endif
  } else {
#if LOADKIT_GLOO
    auto gloo = c10d::ProcessGroupGloo::Options::create(timeout);
    gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, gloo);
#endif
  }
  (void)store, (void)rank, (void)size, (void)timeout;
  fail(ErrorKind::Usage, "no process group backend for ", device.str(), " in this build");
}

}  // namespace

struct ProcessGroup::Impl {
  std::string name;
  int rank = 0, size = 1;
  std::vector<int> global_ranks;
  c10::Device device = c10::Device(c10::kCPU);
  std::chrono::milliseconds timeout{};
  c10::intrusive_ptr<c10d::Backend> backend;
  c10::intrusive_ptr<c10d::Store> exchange_store;  ///< a prefix of its own: no clash with the backend's keys
  c10::intrusive_ptr<c10d::Store> root_store;      ///< the RankGroup's: where a failed rank publishes why
  uint64_t exchanges = 0;
  /// The oldest exchange round whose key this member has not deleted yet.
  uint64_t undeleted_from = 0;
  /// The member whose process hosts the store (global rank 0 where no launcher's agent hosts it),
  /// or -1 (a launcher's agent hosts it, or its host is not a member). Where there is one, every
  /// exchange round is acknowledged (acknowledge).
  int store_host = -1;

  static std::string ack_key(uint64_t round, int member) { return cat(round, "/ack/", member); }

  /// The store keeps every key until it is deleted, and a long-lived process exchanges at every
  /// sync and every fan-out round: without this, the store's host (rank 0, or torchrun's agent)
  /// grew by every payload ever exchanged, manifests of every tensor name included. Called once
  /// every member's key of `round` has arrived: every member has then left the rounds before it,
  /// the only ones where their keys are read, so this member's own keys of those rounds can go. A
  /// round left early (a decisive payload) deletes nothing; the next round that every member
  /// reaches deletes its keys too.
  void forget_rounds_before(uint64_t round) {
    try {
      for (; undeleted_from < round; ++undeleted_from) {
        exchange_store->deleteKey(cat(undeleted_from, "/", rank));
        if (store_host >= 0 && rank != store_host) exchange_store->deleteKey(ack_key(undeleted_from, rank));
      }
    } catch (const std::exception&) {
      // The exchange itself succeeded; a store that has gone since says so at the next one.
    }
  }

  /// Where a member hosts the store, it must not leave a round before every other member has read
  /// it: a host that leaves and exits takes the store with it. Measured before this existed, with a
  /// broadcast sender that was rank 0 and exited as soon as send_weights() returned: in 11 of 40
  /// receiver runs, the receiver was still reading the last agreement, found the store gone and
  /// rolled back an update that every rank had accepted; and a failing rank 0 took its error with
  /// it (the receivers said "the store is unreachable"). So every other member acknowledges each
  /// round once it has read it, and the host leaves a round once all have, or after kLinger (a
  /// member dead since it wrote, or one still busy in its own step when a failure decided the round).
  void acknowledge(uint64_t round) {
    static constexpr auto kLinger = std::chrono::seconds(10);
    if (rank != store_host) {
      exchange_store->set(ack_key(round, rank), std::vector<uint8_t>{1});
      return;
    }
    std::vector<std::string> acks;
    for (int r = 0; r < size; ++r)
      if (r != rank) acks.push_back(ack_key(round, r));
    const auto until = Clock::now() + std::min<std::chrono::milliseconds>(timeout, kLinger);
    while (!acks.empty() && !exchange_store->check(acks) && Clock::now() < until)
      std::this_thread::sleep_for(std::chrono::microseconds(200));
  }

  ~Impl() {
    // NCCL wants an orderly shutdown (it warns and may hang in its watchdog otherwise).
    try {
      if (backend) backend->shutdown();
    } catch (...) {
    }
  }

  std::string label(const std::string& op) const { return cat("process group '", name, "': ", op); }

  /// Runs one blocking collective (the tensor-parallel forward's).
  template <class Start>
  void run(const char* what, Start start) {
    try {
      start()->wait(timeout);
    } catch (const std::exception& e) {
      if (dynamic_cast<const Error*>(&e)) throw;
      fail(ErrorKind::Other, "tensor parallel ", what, " on rank ", rank, " failed: ", failure_message(e));
    }
  }
};

struct ProcessGroup::Pending::State {
  c10::intrusive_ptr<c10d::Work> work;
  std::string what;
  int rank = 0;
  std::chrono::milliseconds timeout{};
};

ProcessGroup::Pending::Pending() = default;
ProcessGroup::Pending::~Pending() = default;
ProcessGroup::Pending::Pending(Pending&&) noexcept = default;
ProcessGroup::Pending& ProcessGroup::Pending::operator=(Pending&&) noexcept = default;
bool ProcessGroup::Pending::valid() const { return state_ != nullptr; }

void ProcessGroup::Pending::wait() {
  if (!state_) return;
  const std::unique_ptr<State> s = std::move(state_);
  try {
    s->work->wait(s->timeout);
  } catch (const std::exception& e) {
    fail(ErrorKind::Other, s->what, " failed on rank ", s->rank, ": ", failure_message(e));
  }
}

ProcessGroup::ProcessGroup(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
ProcessGroup::~ProcessGroup() = default;
const std::string& ProcessGroup::name() const { return impl_->name; }
int ProcessGroup::rank() const { return impl_->rank; }
int ProcessGroup::size() const { return impl_->size; }
c10::Device ProcessGroup::device() const { return impl_->device; }
int ProcessGroup::global_rank(int group_rank) const { return impl_->global_ranks.at(group_rank); }

ProcessGroup::Pending ProcessGroup::broadcast(at::Tensor& tensor, int root, const std::string& what) {
  Pending pending;
  pending.state_ = std::make_unique<Pending::State>();
  pending.state_->what = impl_->label(cat("broadcast of ", what, " from rank ", root));
  pending.state_->rank = impl_->rank;
  pending.state_->timeout = impl_->timeout;
  std::vector<at::Tensor> io{tensor};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  try {
    pending.state_->work = impl_->backend->broadcast(io, options);
  } catch (const std::exception& e) {
    fail(ErrorKind::Other, pending.state_->what, " could not start on rank ", impl_->rank, ": ", failure_message(e));
  }
  return pending;
}

ProcessGroup::Pending ProcessGroup::all_gather(at::Tensor& output, at::Tensor& input, const std::string& what) {
  Pending pending;
  pending.state_ = std::make_unique<Pending::State>();
  pending.state_->what = impl_->label(cat("all-gather of ", what));
  pending.state_->rank = impl_->rank;
  pending.state_->timeout = impl_->timeout;
  try {
    pending.state_->work = impl_->backend->_allgather_base(output, input);
  } catch (const std::exception& e) {
    fail(ErrorKind::Other, pending.state_->what, " could not start on rank ", impl_->rank, ": ", failure_message(e));
  }
  return pending;
}

std::vector<std::string> ProcessGroup::exchange(const std::string& payload,
                                                const std::function<bool(const std::string&)>& decisive) {
  Impl& s = *impl_;
  const uint64_t round = s.exchanges++;
  auto key = [&](int r) { return cat(round, "/", r); };
  auto unreachable = [&](const std::exception& e) {
    fail(ErrorKind::Other, s.label("exchange"), " on rank ", s.rank, ": the store is unreachable: ", failure_message(e));
  };
  std::vector<std::optional<std::string>> seen(s.size);
  size_t arrived = 0;
  try {
    s.exchange_store->set(key(s.rank), std::vector<uint8_t>(payload.begin(), payload.end()));
    // Poll rather than block on every key: a decisive payload is noticed at once, whoever sent it.
    const auto deadline = Clock::now() + s.timeout;
    uint64_t polls = 0;
    bool decided = false;
    while (arrived < seen.size() && !decided) {
      for (int r = 0; r < s.size && !decided; ++r) {
        if (seen[r] || !s.exchange_store->check({key(r)})) continue;
        seen[r] = to_string(s.exchange_store->get(key(r)));
        ++arrived;
        decided = decisive && decisive(*seen[r]);
      }
      if (arrived == seen.size() || decided) break;
      // A member that failed outside this exchange (a CLI step publishes why) will never arrive: say so now.
      if (++polls % 25 == 0)
        for (int r = 0; r < s.size; ++r)
          if (!seen[r] && s.root_store->check({failure_key(s.global_ranks[r])})) {
            const std::string value = to_string(s.root_store->get(failure_key(s.global_ranks[r])));
            const size_t nl = value.find('\n');
            fail(error_kind(std::atoi(value.substr(0, nl).c_str())), "rank ", s.global_ranks[r], ": ",
                 value.substr(nl + 1));
          }
      if (Clock::now() > deadline) {
        std::string missing;
        for (int r = 0; r < s.size; ++r)
          if (!seen[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(s.global_ranks[r]);
        fail(ErrorKind::Other, s.label("exchange"), ": rank(s) ", missing, " did not arrive within ",
             s.timeout.count() / 1000, " s (LOADKIT_TP_TIMEOUT)");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (s.store_host >= 0) s.acknowledge(round);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    unreachable(e);
  }
  if (arrived == seen.size()) s.forget_rounds_before(round);
  std::vector<std::string> out;
  for (auto& v : seen) out.push_back(v ? std::move(*v) : std::string());
  return out;
}


std::shared_ptr<TensorParallelGroup> ProcessGroup::tensor_parallel() {
  // A local class: it may name the private Impl, and keeps it alive.
  class View final : public TensorParallelGroup {
   public:
    explicit View(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
    int rank() const override { return impl_->rank; }
    int size() const override { return impl_->size; }

    void all_reduce(at::Tensor& tensor) override {
      std::vector<at::Tensor> io{tensor.is_contiguous() ? tensor : tensor.contiguous()};
      impl_->run("all_reduce", [&] { return impl_->backend->allreduce(io); });
      if (!io[0].is_same(tensor)) tensor.copy_(io[0]);
    }

    at::Tensor all_gather(const at::Tensor& tensor, int64_t dim) override {
      std::vector<at::Tensor> in{tensor.contiguous()};
      std::vector<std::vector<at::Tensor>> out(1);
      for (int r = 0; r < impl_->size; ++r) out[0].push_back(at::empty_like(in[0]));
      impl_->run("all_gather", [&] { return impl_->backend->allgather(out, in); });
      return at::cat(out[0], dim);
    }

   private:
    std::shared_ptr<Impl> impl_;
  };
  return std::make_shared<View>(impl_);
}

bool already_reported(const std::exception& e) { return dynamic_cast<const ReportedFailure*>(&e) != nullptr; }

ErrorKind error_kind(int exit_code) {
  return exit_code >= 2 && exit_code <= 4 ? static_cast<ErrorKind>(exit_code) : ErrorKind::Other;
}

std::string failure_message(const std::exception& e) {
  // c10d's messages may span lines; ours are one.
  auto* c10 = dynamic_cast<const c10::Error*>(&e);
  std::string text = c10 ? c10->what_without_backtrace() : e.what();
  for (char& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

std::optional<RankEnv> RankEnv::from_environment() {
  if (!std::getenv("WORLD_SIZE")) return std::nullopt;
  RankEnv env;
  env.world_size = env_int("WORLD_SIZE", 1);
  env.rank = env_int("RANK", 0);
  env.local_rank = env_int("LOCAL_RANK", env.rank);
  env.master_addr = env_str("MASTER_ADDR", env.master_addr);
  env.master_port = env_int("MASTER_PORT", env.master_port);
  env.agent_store = env_str("TORCHELASTIC_USE_AGENT_STORE", "") == "True";
  env.local_launch = env_str("LOADKIT_TP_LAUNCHED", "") == "1";
  if (env.world_size < 1) fail(ErrorKind::Usage, "environment variable WORLD_SIZE must be at least 1");
  if (env.rank >= env.world_size)
    fail(ErrorKind::Usage, "environment variable RANK=", env.rank, " is not below WORLD_SIZE=", env.world_size);
  if (env.master_port < 1 || env.master_port > 65535)
    fail(ErrorKind::Usage, "environment variable MASTER_PORT=", env.master_port, " is not a TCP port");
  return env;
}

std::chrono::milliseconds collective_timeout() {
  return std::chrono::milliseconds(int64_t{1000} * env_int("LOADKIT_TP_TIMEOUT", 300));
}

std::optional<std::string> tp_unavailable_reason(const std::string& device_type) {
  if (device_type == "cuda") {
#if LOADKIT_NCCL
    return std::nullopt;
#else
    return "this build has no NCCL (built without LOADKIT_CUDA or without nccl.h)";
#endif
  }
#if LOADKIT_GLOO
  return std::nullopt;
#else
  return "this build has no Gloo (gloo headers were not found at build time: install libgloo-dev)";
#endif
}

struct RankGroup::Impl {
  int rank = 0, size = 1;
  c10::Device device = c10::Device(c10::kCPU);
  std::chrono::milliseconds timeout{};
  c10::intrusive_ptr<c10d::Store> store;
  bool rank0_hosts_store = false;  ///< no launcher's agent hosts it
  std::shared_ptr<ProcessGroup> world;
  std::shared_ptr<TensorParallelGroup> tp;

  /// A group over `ranks` with its own store prefix (backend keys and exchange keys apart).
  std::shared_ptr<ProcessGroup> make_group(const std::string& name, const std::string& prefix,
                                           const std::vector<int>& ranks) {
    auto g = std::make_shared<ProcessGroup::Impl>();
    g->name = name;
    g->global_ranks = ranks;
    g->size = static_cast<int>(ranks.size());
    g->rank = static_cast<int>(std::find(ranks.begin(), ranks.end(), rank) - ranks.begin());
    g->device = device;
    g->timeout = timeout;
    g->exchange_store = c10::make_intrusive<c10d::PrefixStore>(prefix + "/exchange", store);
    g->root_store = store;
    if (auto host = std::find(ranks.begin(), ranks.end(), 0); rank0_hosts_store && host != ranks.end())
      g->store_host = static_cast<int>(host - ranks.begin());
    g->backend = make_backend(c10::make_intrusive<c10d::PrefixStore>(prefix, store), g->rank, g->size, device, timeout);
    return std::shared_ptr<ProcessGroup>(new ProcessGroup(std::move(g)));
  }
};

RankGroup::RankGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RankGroup::~RankGroup() = default;
int RankGroup::rank() const { return impl_->rank; }
int RankGroup::size() const { return impl_->size; }
std::shared_ptr<TensorParallelGroup> RankGroup::tp_group() const { return impl_->tp; }
std::shared_ptr<ProcessGroup> RankGroup::world() const { return impl_->world; }

std::unique_ptr<RankGroup> RankGroup::join(const RankEnv& env, const std::string& device) {
  const c10::Device dev(device);
  if (auto reason = tp_unavailable_reason(dev.is_cuda() ? "cuda" : "cpu"))
    fail(ErrorKind::Usage, "--tp-size ", env.world_size, " on ", device, ": ", *reason);
  // c10d's store client logs every failed call as a warning with a stack trace (a peer that died
  // mid-sync, a store that went with it); loadkit reports each failure itself, as one line.
  // TORCH_CPP_LOG_LEVEL set by the user wins.
  if (!std::getenv("TORCH_CPP_LOG_LEVEL") && FLAGS_caffe2_log_level < 2) FLAGS_caffe2_log_level = 2;  // ERROR
  auto impl = std::make_unique<Impl>();
  impl->rank = env.rank;
  impl->size = env.world_size;
  impl->timeout = collective_timeout();
  impl->device = dev;
  try {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(env.master_port);
    options.isServer = !env.agent_store && env.rank == 0;
    if (options.isServer) options.numWorkers = env.world_size;
    options.waitWorkers = false;
    options.timeout = impl->timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
    impl->rank0_hosts_store = !env.agent_store;
    if (dev.is_cuda()) {
#if LOADKIT_NCCL
      const auto index = dev.has_index() ? dev.index() : static_cast<c10::DeviceIndex>(env.local_rank);
      c10::cuda::set_device(index);
      impl->device = c10::Device(c10::kCUDA, index);
      // A collective that times out (a peer died) then throws on this rank instead of the
      // watchdog ending the process: a weight sync must be able to roll back first.
      ::setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", /*overwrite=*/0);
#endif
    }
    std::vector<int> all(env.world_size);
    for (int r = 0; r < env.world_size; ++r) all[r] = r;
    impl->world = impl->make_group("world", "loadkit/tp", all);
    impl->tp = impl->world->tensor_parallel();
  } catch (const std::exception& e) {
    if (dynamic_cast<const Error*>(&e)) throw;
    const std::string message = cat("rank ", env.rank, " could not join the group at ", env.master_addr, ":",
                                    env.master_port, ": ", failure_message(e));
    // A peer that failed right after joining (its own error, published) closes its connections
    // while this rank may still be connecting: this is then a consequence, not the cause. Under
    // the local launcher it is published apart, and the launcher reports it only when no rank
    // published a failure of its own.
    if (env.local_launch && impl->store) {
      try {
        impl->store->set(join_failure_key(env.rank), cat(exit_code(ErrorKind::Other), "\n", message));
        throw ReportedFailure(ErrorKind::Other, message);
      } catch (const c10::Error&) {
        // The store is gone too: report it here.
      }
    }
    fail(ErrorKind::Other, message);
  }
  return std::unique_ptr<RankGroup>(new RankGroup(std::move(impl)));
}

std::shared_ptr<ProcessGroup> RankGroup::new_group(const std::string& name, const std::vector<int>& ranks) {
  std::set<int> distinct(ranks.begin(), ranks.end());
  if (distinct.size() != ranks.size() || ranks.empty() || *distinct.begin() < 0 || *distinct.rbegin() >= impl_->size)
    fail(ErrorKind::Usage, "process group '", name, "': its ranks must be distinct ranks below ", impl_->size);
  if (!distinct.count(impl_->rank))
    fail(ErrorKind::Usage, "process group '", name, "': rank ", impl_->rank, " is not one of its ranks");
  try {
    return impl_->make_group(name, "loadkit/group/" + name, ranks);
  } catch (const std::exception& e) {
    if (dynamic_cast<const Error*>(&e)) throw;
    fail(ErrorKind::Other, "rank ", impl_->rank, " could not create process group '", name, "': ", failure_message(e));
  }
}

void RankGroup::publish_failure(int exit_code, const std::string& message) {
  try {
    impl_->store->set(failure_key(impl_->rank), cat(exit_code, "\n", message));
  } catch (const std::exception&) {
    // The store is gone (the launcher died): nothing left to tell.
  }
}

std::vector<std::string> RankGroup::step(const std::string& name, const std::function<std::string()>& fn) {
  Impl& s = *impl_;
  std::string payload;
  try {
    payload = fn();
  } catch (const Error& e) {
    publish_failure(exit_code(e.kind()), e.what());
    s.store->set(step_key(name, s.rank), cat("fail\n", exit_code(e.kind()), "\n", e.what()));
    throw;
  } catch (const c10::Error& e) {
    publish_failure(1, e.what_without_backtrace());
    s.store->set(step_key(name, s.rank), cat("fail\n1\n", e.what_without_backtrace()));
    throw;
  } catch (const std::exception& e) {
    publish_failure(1, e.what());
    s.store->set(step_key(name, s.rank), cat("fail\n1\n", e.what()));
    throw;
  }
  s.store->set(step_key(name, s.rank), "ok\n" + payload);

  // Poll rather than block on every key: a failed rank is noticed at once,
  // whatever its place in the rank order.
  std::vector<std::optional<std::string>> seen(s.size);
  const auto deadline = Clock::now() + s.timeout;
  size_t done = 0;
  while (done < seen.size()) {
    for (int r = 0; r < s.size; ++r) {
      if (seen[r] || !s.store->check({step_key(name, r)})) continue;
      std::string value = to_string(s.store->get(step_key(name, r)));
      if (value.rfind("fail\n", 0) == 0) {
        const size_t nl = value.find('\n', 5);
        const int code = std::atoi(value.substr(5, nl - 5).c_str());
        throw ReportedFailure(error_kind(code), cat("rank ", r, ": ", value.substr(nl + 1)));
      }
      seen[r] = value.substr(3);
      ++done;
    }
    if (done == seen.size()) break;
    if (Clock::now() > deadline) {
      std::string missing;
      for (int r = 0; r < s.size; ++r)
        if (!seen[r]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      fail(ErrorKind::Other, "rank(s) ", missing, " did not finish step '", name, "' within ",
           s.timeout.count() / 1000, " s (LOADKIT_TP_TIMEOUT)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::vector<std::string> out;
  for (auto& v : seen) out.push_back(std::move(*v));
  return out;
}

}  // namespace loadkit
