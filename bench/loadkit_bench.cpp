// In-process load/reload/update benchmark: what a long-lived inference
// process (an RL trainer's colocated engine) sees, repeat after repeat.
//
//   loadkit_bench reload --model A --from B [--quantization fp8] [--repeats N] [--device cuda]
//   loadkit_bench update --model A --from B [--quantization none] [--repeats N] [--device cuda]
//   loadkit_bench load   --model A [--repeats N] [--device cuda]
//
// reload: loads A, then reloads B, A, B, ... from the page cache (the reload
// reports' seconds). update: B's tensors are first put on the device (as a
// colocated trainer holds them), then handed to begin_update/update/
// finish_update in one chunk; the same bytes copied device-to-device
// (per tensor and as one block) are measured in the same process. load: A
// loaded again and again in one process (pinned staging reused).
//
// Where the time goes: every staged load and reload reports its stream's
// profile (runtime/src/staging/staged_stream.h: consumer waits and work,
// readers' reads and waits, pinning, tensors read from the mapping) and, for
// reloads, the time before the stream opened (open the files, validate every
// tensor through the loaders on meta stand-ins, plan) and after it closed
// (delayed modules, pointer checks, the final synchronisation). Updates report
// the host time per tensor and, apart, the validation alone.
// Prints one JSON object. A benchmark, never a test.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

// Internals beyond the public API: the staged stream's profile, checkpoint headers for meta stand-ins.
#include "formats/checkpoint_files.h"
#include "staging/staged_stream.h"
#include "tensor_io.h"
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"
#include "loadkit/runtime/tensor_files.h"

namespace {

using namespace loadkit;
using Clock = std::chrono::steady_clock;
using json = nlohmann::ordered_json;

struct Args {
  std::string mode, model, from, device = "cuda", quantization = "none", plugin_dir;
  int repeats = 5;
};

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) fail(ErrorKind::Usage, "usage: loadkit_bench load|reload|update --model A [--from B] ...");
  a.mode = argv[1];
  for (int i = 2; i < argc; ++i) {
    const std::string key = argv[i];
    if (i + 1 >= argc) fail(ErrorKind::Usage, key, ": missing value");
    const std::string value = argv[++i];
    if (key == "--model") a.model = value;
    else if (key == "--from") a.from = value;
    else if (key == "--device") a.device = value;
    else if (key == "--quantization") a.quantization = value;
    else if (key == "--plugin-dir") a.plugin_dir = value;
    else if (key == "--repeats") a.repeats = std::stoi(value);
    else fail(ErrorKind::Usage, "unknown option ", key);
  }
  if (a.model.empty() || (a.mode != "load" && a.from.empty())) fail(ErrorKind::Usage, "--model and --from are needed");
  return a;
}

json summary(const std::vector<double>& seconds, uint64_t bytes) {
  std::vector<double> s = seconds;
  std::sort(s.begin(), s.end());
  const double median = s[s.size() / 2];
  return {{"bytes", bytes}, {"seconds_min", s.front()}, {"seconds_median", median},
          {"gb_per_s", bytes / s.front() / 1e9}, {"gb_per_s_median", bytes / median / 1e9}, {"seconds", seconds}};
}

json report_fields(const LoadReport& r) {
  return {{"peak_extra_device_bytes", r.peak_extra_device_bytes ? json(*r.peak_extra_device_bytes) : json(nullptr)},
          {"pointers_stable", r.pointers_stable},
          {"layers_processed", r.layers_processed}};
}

/// Waits for the work queued on `device` (nothing to wait for on the CPU).
void synchronize(const c10::Device& device) {
  if (device.is_cuda()) c10::impl::getDeviceGuardImpl(device.type())->synchronizeDevice(device.index());
}

/// Seconds of `fn` with the device idle before and after.
template <class Fn>
double timed(const c10::Device& device, Fn&& fn) {
  synchronize(device);
  const auto t = Clock::now();
  fn();
  synchronize(device);
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

/// The last staged stream's profile (null without one, e.g. on the plain path).
json staging_json() {
  const auto p = last_staging_profile();
  if (!p) return nullptr;
  json longest = json::array();
  for (const auto& [name, ms] : p->longest_work) longest.push_back({{"after", name}, {"ms", ms}});
  return {{"tensors", p->tensors}, {"staged_bytes", p->staged_bytes}, {"bypassed_tensors", p->bypassed_tensors},
          {"bypassed_bytes", p->bypassed_bytes}, {"window_bytes", p->window_bytes}, {"limit_bytes", p->limit_bytes},
          {"readers", p->readers}, {"open_ms", p->open_ms}, {"first_tensor_ms", p->first_tensor_ms},
          {"consumer_wait_ms", p->consumer_wait_ms}, {"consumer_waits", p->consumer_waits},
          {"consumer_work_ms", p->consumer_work_ms},
          {"consumer_work_after_reserved_ms", p->consumer_work_after_reserved_ms},
          {"consumer_free_ms", p->consumer_free_ms}, {"consumer_event_ms", p->consumer_event_ms}, {"longest_work", longest},
          {"read_ms", p->read_ms}, {"window_wait_ms", p->window_wait_ms}, {"ring_wait_ms", p->ring_wait_ms},
          {"pinning_ms", p->pinning_ms}};
}

/// Meta stand-ins (names, shapes, dtypes; no data) of every tensor of the checkpoint in `dir`.
std::vector<NamedWeight> meta_weights(const std::string& dir) {
  std::vector<NamedWeight> out;
  for (const auto& file : safetensors::open_checkpoint(dir).files)
    for (const auto& info : file->tensors())
      out.push_back({info.name, at::empty(info.shape, at::TensorOptions().dtype(to_scalar_type(info.dtype)).device(at::kMeta)),
                     file->path()});
  return out;
}

/// Seconds to validate a whole update of `planned` (meta) against the model: the loaders on meta
/// stand-ins for every tensor, what a reload and an update run before writing anything.
std::vector<double> validation_seconds(LoadedModel& model, const std::vector<NamedWeight>& planned, int repeats) {
  std::vector<double> seconds;
  for (int i = 0; i < repeats; ++i) {
    const auto t = Clock::now();
    model.begin_update();
    model.validate_update(planned, /*complete=*/true);
    seconds.push_back(std::chrono::duration<double>(Clock::now() - t).count());
    model.rollback_update();  // without a journal: ends the session, nothing was written
  }
  return seconds;
}

int run(const Args& a) {
  c10::AutoGradMode no_grad(false);
  log::set_level(log::parse_level("warn"));
  std::vector<std::string> dirs;
  if (!a.plugin_dir.empty()) dirs.push_back(a.plugin_dir);
  Registry registry(Registry::search_path(dirs));
  LoadOptions options;
  options.model_dir = a.model;
  options.device = a.device;
  options.quantization = a.quantization;
  json out = {{"mode", a.mode}, {"model", a.model}, {"from", a.from}, {"device", a.device},
              {"quantization", a.quantization}};

  if (a.mode == "load") {
    std::vector<double> seconds;
    json last, profiles = json::array();
    uint64_t bytes = 0;
    for (int i = 0; i < a.repeats; ++i) {
      auto model = LoadedModel::load(options, registry);
      seconds.push_back(model->report().seconds);
      bytes = model->report().bytes;
      last = report_fields(model->report());
      profiles.push_back(staging_json());  // the first load of the process pins the readers' buffers
    }
    out["load"] = summary(seconds, bytes);
    out["load"].update(last);
    out["load"]["staging"] = profiles;
    std::cout << out.dump(2) << std::endl;
    return 0;
  }

  auto model = LoadedModel::load(options, registry);
  const c10::Device device(model->report().device);
  if (a.mode == "reload") {
    std::vector<double> seconds;
    uint64_t peak = 0, bytes = 0;
    bool stable = true;
    json stages = json::array(), by_plan = json::array();
    for (int i = 0; i < a.repeats; ++i) {
      const auto called = Clock::now();
      const LoadReport& r = model->reload(i % 2 == 0 ? a.from : a.model);
      by_plan.push_back(r.reload_by_plan);  // the first records the plan the others replay
      const auto returned = Clock::now();
      seconds.push_back(r.seconds);
      bytes = r.bytes;
      peak = std::max<uint64_t>(peak, r.peak_extra_device_bytes.value_or(0));
      stable = stable && r.pointers_stable;
      json stage = {{"total_ms", ms_between(called, returned)}, {"staging", staging_json()}};
      if (const auto p = last_staging_profile(); p && p->opened_at > called) {
        stage["before_stream_ms"] = ms_between(called, p->opened_at);  // open files, validate, plan
        stage["after_stream_ms"] = ms_between(p->closed_at, returned);  // finish, checks, final sync
        for (const auto& [name, ms] : r.stage_ms)
          if (name == "open_checkpoint") stage["open_checkpoint_ms"] = ms;  // part of before_stream
      }
      stages.push_back(stage);
    }
    out["reload"] = summary(seconds, bytes);
    out["reload"]["peak_extra_device_bytes"] = peak;
    out["reload"]["pointers_stable"] = stable;
    out["reload"]["stages"] = stages;
    out["reload"]["by_plan"] = by_plan;
    const auto planned = meta_weights(a.from);
    out["reload"]["validate"] = summary(validation_seconds(*model, planned, a.repeats), bytes);
    out["reload"]["validate"]["tensors"] = planned.size();
  } else if (a.mode == "update") {
    // B's tensors on the device, as a colocated trainer holds them.
    std::vector<NamedWeight> weights;
    uint64_t bytes = 0;
    for (auto& w : read_checkpoint(a.from)) {
      bytes += w.tensor.nbytes();
      weights.push_back({w.name, w.tensor.to(device), "trainer"});
    }
    std::vector<double> seconds, host;
    uint64_t peak = 0;
    bool stable = true;
    int by_plan = 0, replayed = 0;
    for (int i = 0; i < a.repeats; ++i) {
      seconds.push_back(timed(device, [&] {
        const auto t = Clock::now();
        model->begin_update();
        model->update(weights);
        const LoadReport& r = model->finish_update();
        host.push_back(std::chrono::duration<double>(Clock::now() - t).count());  // finish_update synchronises once
        peak = std::max<uint64_t>(peak, r.peak_extra_device_bytes.value_or(0));
        stable = stable && r.pointers_stable;
        by_plan = r.chunks_by_plan;
        replayed = r.chunks_replayed;
      }));
    }
    out["update"] = summary(seconds, bytes);
    // The first sync validates through the loaders and records the chunk's plan; the later ones
    // (the same names, shapes and strides: a trainer's next step) go by it.
    out["update"]["host_us_per_tensor_first"] = host.front() * 1e6 / weights.size();
    out["update"]["last_chunks_by_plan"] = by_plan;
    out["update"]["last_chunks_replayed"] = replayed;
    out["update"]["peak_extra_device_bytes"] = peak;
    out["update"]["pointers_stable"] = stable;
    out["update"]["tensors"] = weights.size();
    out["update"]["host_seconds"] = host;
    out["update"]["host_us_per_tensor"] = *std::min_element(host.begin(), host.end()) * 1e6 / weights.size();
    std::vector<NamedWeight> planned;
    for (const auto& w : weights)
      planned.push_back({w.name, at::empty_like(w.tensor, at::TensorOptions().device(at::kMeta)), w.origin});
    const auto validation = validation_seconds(*model, planned, a.repeats);
    out["update"]["validate"] = summary(validation, bytes);
    out["update"]["validate"]["us_per_tensor"] =
        *std::min_element(validation.begin(), validation.end()) * 1e6 / planned.size();
    // The same bytes copied device-to-device: tensor by tensor into preallocated tensors, and as one block.
    std::vector<at::Tensor> targets;
    for (const auto& w : weights) targets.push_back(at::empty_like(w.tensor));
    std::vector<double> per_tensor, block;
    at::Tensor src = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
    at::Tensor dst = at::empty_like(src);
    for (int i = 0; i < a.repeats; ++i) {
      per_tensor.push_back(timed(device, [&] {
        for (size_t k = 0; k < weights.size(); ++k) targets[k].copy_(weights[k].tensor);
      }));
      block.push_back(timed(device, [&] { dst.copy_(src); }));
    }
    out["d2d_copy_per_tensor"] = summary(per_tensor, bytes);
    out["d2d_copy_one_block"] = summary(block, bytes);
  } else {
    fail(ErrorKind::Usage, "mode '", a.mode, "' is not load, reload or update");
  }
  std::cout << out.dump(2) << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const loadkit::Error& e) {
    std::cerr << "loadkit_bench: error: " << e.what() << std::endl;
    return loadkit::exit_code(e.kind());
  } catch (const std::exception& e) {
    std::cerr << "loadkit_bench: error: " << e.what() << std::endl;
    return 1;
  }
}
