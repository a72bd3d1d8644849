// The tensor-parallel process group over c10d: TCPStore rendezvous, Gloo on
// the CPU, NCCL on CUDA, and the store-based step agreement that lets every
// rank stop with the failing rank's error instead of waiting in a collective.

#include <ATen/ATen.h>
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

#include <chrono>
#include <cstdlib>
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

ErrorKind kind_of(int code) {
  switch (code) {
    case 2: return ErrorKind::Usage;
    case 3: return ErrorKind::Input;
    case 4: return ErrorKind::Plugin;
    default: return ErrorKind::Other;
  }
}

/// Another rank's failure, rethrown here: reported by that rank, not again by this one.
class OtherRankFailure : public Error {
 public:
  using Error::Error;
};

std::string to_string(const std::vector<uint8_t>& bytes) { return std::string(bytes.begin(), bytes.end()); }

/// TensorParallelGroup over one c10d backend; collectives wait with the job's timeout.
class C10dGroup final : public TensorParallelGroup {
 public:
  C10dGroup(c10::intrusive_ptr<c10d::Backend> backend, int rank, int size, std::chrono::milliseconds timeout)
      : backend_(std::move(backend)), rank_(rank), size_(size), timeout_(timeout) {}
  ~C10dGroup() override {
    // NCCL wants an orderly shutdown (it warns and may hang in its watchdog otherwise).
    try {
      backend_->shutdown();
    } catch (...) {
    }
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce(at::Tensor& tensor) override {
    std::vector<at::Tensor> io{tensor.is_contiguous() ? tensor : tensor.contiguous()};
    run("all_reduce", [&] { return backend_->allreduce(io); });
    if (!io[0].is_same(tensor)) tensor.copy_(io[0]);
  }

  at::Tensor all_gather(const at::Tensor& tensor, int64_t dim) override {
    std::vector<at::Tensor> in{tensor.contiguous()};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < size_; ++r) out[0].push_back(at::empty_like(in[0]));
    run("all_gather", [&] { return backend_->allgather(out, in); });
    return at::cat(out[0], dim);
  }

 private:
  template <class Start>
  void run(const char* what, Start start) {
    try {
      start()->wait(timeout_);
    } catch (const c10::Error& e) {
      fail(ErrorKind::Other, "tensor parallel ", what, " on rank ", rank_, " failed: ", e.what_without_backtrace());
    } catch (const std::exception& e) {
      fail(ErrorKind::Other, "tensor parallel ", what, " on rank ", rank_, " failed: ", e.what());
    }
  }

  c10::intrusive_ptr<c10d::Backend> backend_;
  int rank_, size_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

bool is_other_rank_failure(const std::exception& e) { return dynamic_cast<const OtherRankFailure*>(&e) != nullptr; }

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
  std::chrono::milliseconds timeout{};
  c10::intrusive_ptr<c10d::Store> store;
  std::shared_ptr<C10dGroup> group;
};

RankGroup::RankGroup(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RankGroup::~RankGroup() = default;
int RankGroup::rank() const { return impl_->rank; }
int RankGroup::size() const { return impl_->size; }
std::shared_ptr<TensorParallelGroup> RankGroup::tp_group() const { return impl_->group; }

std::unique_ptr<RankGroup> RankGroup::join(const RankEnv& env, const std::string& device) {
  const c10::Device dev(device);
  if (auto reason = tp_unavailable_reason(dev.is_cuda() ? "cuda" : "cpu"))
    fail(ErrorKind::Usage, "--tp-size ", env.world_size, " on ", device, ": ", *reason);
  auto impl = std::make_unique<Impl>();
  impl->rank = env.rank;
  impl->size = env.world_size;
  impl->timeout = collective_timeout();
  c10::intrusive_ptr<c10d::Backend> backend;
  try {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(env.master_port);
    options.isServer = !env.agent_store && env.rank == 0;
    if (options.isServer) options.numWorkers = env.world_size;
    options.waitWorkers = false;
    options.timeout = impl->timeout;
    impl->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
    auto pg_store = c10::make_intrusive<c10d::PrefixStore>("loadkit/tp", impl->store);
    if (dev.is_cuda()) {
#if LOADKIT_NCCL
      c10::cuda::set_device(dev.has_index() ? dev.index() : static_cast<c10::DeviceIndex>(env.local_rank));
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      nccl->timeout = impl->timeout;
      backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(pg_store, env.rank, env.world_size, nccl);
#endif
    } else {
#if LOADKIT_GLOO
      auto gloo = c10d::ProcessGroupGloo::Options::create(impl->timeout);
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      backend = c10::make_intrusive<c10d::ProcessGroupGloo>(pg_store, env.rank, env.world_size, gloo);
#endif
    }
  } catch (const c10::Error& e) {
    fail(ErrorKind::Other, "rank ", env.rank, " could not join the group at ", env.master_addr, ":", env.master_port,
         ": ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    if (dynamic_cast<const Error*>(&e)) throw;
    fail(ErrorKind::Other, "rank ", env.rank, " could not join the group at ", env.master_addr, ":", env.master_port,
         ": ", e.what());
  }
  impl->group = std::make_shared<C10dGroup>(backend, env.rank, env.world_size, impl->timeout);
  return std::unique_ptr<RankGroup>(new RankGroup(std::move(impl)));
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
        throw OtherRankFailure(kind_of(code), cat("rank ", r, ": ", value.substr(nl + 1)));
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
