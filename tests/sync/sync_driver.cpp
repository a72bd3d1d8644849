// One rank of a weight-sync test, started by tests/test_weight_sync.cpp the
// way torchrun starts ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
//
//   sync_driver fsdp      --model A --weights B --out DIR [--tp N] [--quantization Q] [--corrupt-rank R]
//                         [--sparse-rank R]
//   sync_driver broadcast --model A --weights B --out DIR [--bucket-bytes N] [--quantization Q]
//                         [--tokens 1,2,3] [--die-after-bucket K] [--sparse-tensor NAME] [--exit-when-sent 1]
//
// common: --plugin-dir D --device cpu|cuda (cuda: cuda:LOCAL_RANK)
//
// fsdp: every rank is a trainer holding a dim-0 shard (torch.chunk) of each of
// B's tensors and an inference model loaded from A (TP 1, or TP = the world);
// after the sync it writes its kernel state to DIR/rank<R>.safetensors.
// broadcast: rank 0 sends B's tensors; ranks 1.. receive into A loaded at TP =
// world - 1, write DIR/before<R>.safetensors first, then after success
// DIR/rank<R>.safetensors (+ DIR/logits.safetensors from rank 1), after a
// failure DIR/after<R>.safetensors. --die-after-bucket K: the sender SIGKILLs
// itself once every receiver has applied bucket K (0-based; DIR/applied<R> says so).
// --sparse-tensor NAME: the sender passes that tensor as a sparse one (no plain data to send).
// --exit-when-sent 1: the sender's process ends as soon as send_weights() returns (a trainer
// whose script ends there), taking the store it hosts as rank 0 with it; no raw broadcast.
// SIGPIPE is at its default here, as in a C++ host that never touched it: the receivers then
// write to the dead sender's store socket, and that must fail as an error, not end them.
// Errors: "loadkit: error: <line>" on stderr and the exit code of its kind.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <thread>

#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"
#include "loadkit/runtime/weight_sync.h"
#include "model_checks.h"
#include "tensor_io.h"

namespace loadkit::test {
namespace {

using Args = std::map<std::string, std::string>;

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key.rfind("--", 0) != 0) fail(ErrorKind::Usage, "sync_driver: expected --key value, got '", key, "'");
    args[key.substr(2)] = argv[i + 1];
  }
  return args;
}

std::string get(const Args& args, const std::string& key, const std::string& fallback = "") {
  auto it = args.find(key);
  if (it != args.end()) return it->second;
  if (fallback.empty()) fail(ErrorKind::Usage, "sync_driver: --", key, " is required");
  return fallback;
}

std::unique_ptr<LoadedModel> load(const Args& args, const std::string& device, int tp_size, int tp_rank,
                                  std::shared_ptr<TensorParallelGroup> tp) {
  static Registry registry({get(args, "plugin-dir")});
  LoadOptions o;
  o.model_dir = get(args, "model");
  o.device = device;
  o.quantization = get(args, "quantization", "none");
  o.tp_size = tp_size;
  o.tp_rank = tp_rank;
  o.tp_group = std::move(tp);
  return LoadedModel::load(o, registry);
}

void dump(LoadedModel& model, const std::string& path) {
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (auto& [name, t] : kernel_state(model)) state.emplace_back(name, t);
  save_tensors(path, state);
}

/// B's tensors, in name order (the same list on every rank).
std::vector<std::pair<std::string, at::Tensor>> weights_of(const Args& args) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [name, t] : read_checkpoint(get(args, "weights"))) out.emplace_back(name, t);
  return out;
}

int fsdp(const Args& args, const RankEnv& env, RankGroup& group, const std::string& device) {
  const int tp = std::stoi(get(args, "tp", "1"));
  auto trainers = group.world();
  auto model = load(args, device, tp, tp > 1 ? env.rank : 0, tp > 1 ? trainers->tensor_parallel() : nullptr);
  const int corrupt = std::stoi(get(args, "corrupt-rank", "-1"));
  const int sparse = std::stoi(get(args, "sparse-rank", "-1"));
  std::vector<LocalShard> shards;
  for (auto& [name, full] : weights_of(args)) {
    const ShardRows rows = fsdp_shard_rows(full.size(0), env.world_size, env.rank);
    at::Tensor local = full.narrow(0, rows.begin, rows.count).clone().to(device);
    // This rank's list differs from the others' in one tensor's dtype.
    if (env.rank == corrupt && name == "model.layers.1.mlp.down_proj.weight") local = local.to(at::kBFloat16);
    // This rank's shard of it is a sparse tensor: same list, but no plain data to gather.
    if (env.rank == sparse && name == "model.layers.1.mlp.down_proj.weight") local = local.to_sparse();
    shards.push_back({name, local, full.sizes().vec()});
  }
  const LoadReport& report = sync_fsdp_shards(*model, *trainers, shards);
  std::cout << "rank " << env.rank << ": synced " << report.tensors << " tensors, " << report.bytes
            << " bytes, pointers " << (report.pointers_stable ? "stable" : "moved") << std::endl;
  dump(*model, get(args, "out") + "/rank" + std::to_string(env.rank) + ".safetensors");
  return 0;
}

int broadcast(const Args& args, const RankEnv& env, RankGroup& group, const std::string& device) {
  std::vector<int> all(env.world_size), receivers;
  for (int r = 0; r < env.world_size; ++r) all[r] = r;
  receivers.assign(all.begin() + 1, all.end());
  auto sync = group.new_group("sync", all);
  BroadcastOptions options;
  options.bucket_bytes = std::stoull(get(args, "bucket-bytes", std::to_string(256ull << 20)));
  const int die_after = std::stoi(get(args, "die-after-bucket", "-1"));
  const std::string out = get(args, "out");
  const bool exit_when_sent = get(args, "exit-when-sent", "0") == "1";

  if (env.rank == 0) {
    std::vector<NamedWeight> weights;
    const std::string sparse = get(args, "sparse-tensor", "-");
    for (auto& [name, t] : weights_of(args))
      weights.push_back({name, name == sparse ? t.to(device).to_sparse() : t.to(device), "trainer"});
    options.on_bucket = [&](int k, int) {
      if (k != die_after) return;
      // Once every receiver has applied bucket k (a file each: the store dies with us).
      for (int r : receivers)
        while (!fs::exists(out + "/applied" + std::to_string(r))) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      ::raise(SIGKILL);
    };
    const BroadcastReport report = send_weights(*sync, weights, options);
    if (exit_when_sent) {
      std::cout.flush();
      ::_exit(0);
    }
    std::cout << "[ MEASURE  ] broadcast " << sync->device().str() << ": " << report.bytes << " bytes in "
              << report.buckets << " buckets of " << options.bucket_bytes << " to " << receivers.size()
              << " receivers: " << report.transfer_seconds << " s = " << report.gb_per_s() * 1e3 << " MB/s"
              << std::endl;
    // The backend's own rate for the same bytes in one piece, measured in the same run.
    at::Tensor raw = at::empty({static_cast<int64_t>(report.bytes)}, at::TensorOptions().dtype(at::kByte).device(sync->device()));
    const auto start = std::chrono::steady_clock::now();
    sync->broadcast(raw, 0, "raw bytes").wait();
    if (raw.is_cuda()) raw.cpu();  // the wait only orders the stream
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << "[ MEASURE  ] raw broadcast of the same bytes: " << s << " s = " << report.bytes / s / 1e6 << " MB/s"
              << std::endl;
    return 0;
  }

  auto tp = group.new_group("receivers", receivers);
  auto model = load(args, device, tp->size(), tp->rank(), tp->tensor_parallel());
  const std::string me = std::to_string(env.rank);
  dump(*model, out + "/before" + me + ".safetensors");
  options.on_bucket = [&](int k, int count) {
    std::cout << "applied bucket " << k + 1 << " of " << count << std::endl;
    if (k == die_after) write_bytes(out + "/applied" + me, "");
  };
  try {
    const LoadReport& report = receive_weights(*model, *sync, options);
    std::cout << "rank " << env.rank << ": received " << report.tensors << " tensors, pointers "
              << (report.pointers_stable ? "stable" : "moved") << ", journal " << report.journal_bytes << " bytes"
              << std::endl;
  } catch (...) {
    dump(*model, out + "/after" + me + ".safetensors");
    throw;
  }
  dump(*model, out + "/rank" + me + ".safetensors");
  if (exit_when_sent) return 0;
  at::Tensor raw = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(sync->device()));
  {
    // The sender's raw-bandwidth broadcast (sized by the sender: ours matches its report).
    uint64_t bytes = 0;
    for (auto& [name, t] : weights_of(args)) bytes += t.nbytes();
    raw = at::empty({static_cast<int64_t>(bytes)}, raw.options());
    sync->broadcast(raw, 0, "raw bytes").wait();
  }
  if (args.count("tokens")) {
    at::Tensor logits = model->logits(parse_tokens(get(args, "tokens")));  // collective over the receivers
    if (tp->rank() == 0) save_tensors(out + "/logits.safetensors", {{"logits", logits}});
  }
  return 0;
}

int run(int argc, char** argv) {
  if (argc < 2) fail(ErrorKind::Usage, "usage: sync_driver fsdp|broadcast --key value ...");
  const std::string mode = argv[1];
  const Args args = parse(argc, argv);
  log::set_level(log::Level::warn);
  const auto env = RankEnv::from_environment();
  if (!env) fail(ErrorKind::Usage, "sync_driver: WORLD_SIZE is not set (start it as a rank)");
  std::string device = get(args, "device", "cpu");
  if (device == "cuda") device = "cuda:" + std::to_string(env->local_rank);
  auto group = RankGroup::join(*env, device);
  if (mode == "fsdp") return fsdp(args, *env, *group, device);
  if (mode == "broadcast") return broadcast(args, *env, *group, device);
  fail(ErrorKind::Usage, "sync_driver: unknown mode '", mode, "'");
}

}  // namespace
}  // namespace loadkit::test

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_DFL);  // whatever the test runner left (see the header comment)
  try {
    return loadkit::test::run(argc, argv);
  } catch (const loadkit::Error& e) {
    std::fprintf(stderr, "loadkit: error: %s\n", e.what());
    return loadkit::exit_code(e.kind());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "loadkit: error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loadkit: error: %s\n", e.what());
    return 1;
  }
}
