// loadkit._loadkit: the runtime's C++ API (Registry, LoadedModel, weight sync)
// for the Python package. loadkit/__init__.py is the documented interface; it
// hands this module arguments already normalised (paths and names as bytes,
// lists of (name, tensor) pairs).
//
// Every call follows host_calls.h: the GIL is released for the whole call,
// a model's lock is only taken without the GIL, and whatever the caller handed
// over is released with the GIL, outside the lock. Tensors cross the boundary
// through torch's own casters: the at::Tensor here is the caller's TensorImpl,
// same storage, no copy.

#include <torch/csrc/utils/pybind.h>  // pybind11 as torch ships it, torch.Tensor <-> at::Tensor

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "host_calls.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"
#include "loadkit/runtime/weight_sync.h"

namespace loadkit::python {
namespace {

namespace py = pybind11;

using Chunk = std::vector<std::pair<std::string, at::Tensor>>;
using Shards = std::vector<std::tuple<std::string, at::Tensor, std::vector<int64_t>>>;

py::str os_str(const std::string& text) { return py::reinterpret_steal<py::str>(os_text(text)); }

py::list os_strs(const std::vector<std::string>& texts) {
  py::list out;
  for (const auto& text : texts) out.append(os_str(text));
  return out;
}

/// The report as Model.report documents it; names and paths as os.fsdecode gives them.
py::dict report_dict(const LoadReport& r) {
  py::dict d;
  d["architecture"] = os_str(r.architecture);
  d["plugin"] = os_str(r.plugin);
  d["device"] = os_str(r.device);
  d["dtype"] = os_str(r.dtype);
  d["quantization"] = os_str(r.quantization);
  d["tensors"] = r.tensors;
  d["bytes"] = r.bytes;
  d["bytes_read"] = r.bytes_read;
  d["seconds"] = r.seconds;
  d["gb_per_s"] = r.gb_per_s();
  d["peak_extra_device_bytes"] = r.peak_extra_device_bytes ? py::object(py::int_(*r.peak_extra_device_bytes)) : py::none();
  d["pointers_stable"] = r.pointers_stable;
  d["layers_processed"] = r.layers_processed;
  d["layers_delayed"] = r.layers_delayed;
  d["untouched_modules"] = os_strs(r.untouched_modules);
  d["journal_bytes"] = r.journal_bytes;
  d["chunks_by_plan"] = r.chunks_by_plan;
  d["chunks_replayed"] = r.chunks_replayed;
  d["reload_by_plan"] = r.reload_by_plan;
  d["reload_order_kept"] = r.reload_order_kept;
  py::dict stages;
  for (const auto& [stage, ms] : r.stage_ms) stages[py::str(stage)] = ms;
  d["stage_ms"] = stages;
  d["written_modules"] = os_strs(r.written_modules);
  d["error"] = r.error.empty() ? py::object(py::none()) : py::object(os_str(r.error));
  return d;
}

/// With the GIL: the caller's tensor, detached (no autograd; same storage). detach() of a tensor
/// subclass dispatches to Python, which is why this runs before the GIL is released; such a
/// subclass (a DTensor of a sharded parameter) holds no plain data and is refused.
at::Tensor plain(const std::string& name, const at::Tensor& tensor, const char* what) {
  at::Tensor detached = tensor.detach();
  if (detached.key_set().has(c10::DispatchKey::Python)) {
    py::object text = py::reinterpret_steal<py::object>(escaped_text(name));
    throw py::type_error(py::str("{}: '{}' is a tensor subclass that dispatches to Python (a DTensor of a sharded "
                                 "parameter?): pass a plain tensor (DTensor.full_tensor()), or FSDP shards to "
                                 "Model.sync_fsdp_shards")
                             .format(what, text));
  }
  return detached;
}

/// A process's place among torchrun's ranks: loadkit's own group (RankGroup::join) for weight
/// sync. Its collectives run one at a time (one mutex, always taken after a model's).
class Group {
 public:
  Group(const std::string& device, std::optional<int> master_port) {
    without_gil([&] {
      std::optional<RankEnv> env = RankEnv::from_environment();
      if (!env)
        fail(ErrorKind::Usage, "loadkit.RankGroup.join: WORLD_SIZE is not set: start the ranks with torchrun ",
             "(or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)");
      if (master_port) {
        // A port of its own: rank 0 hosts loadkit's store there (the agent's store is not used).
        if (*master_port < 1 || *master_port > 65535)
          fail(ErrorKind::Usage, "loadkit.RankGroup.join: master_port=", *master_port, " is not a TCP port");
        env->master_port = *master_port;
        env->agent_store = false;
      }
      group_ = RankGroup::join(*env, device);
    });
  }

  int rank() { return without_gil([&] { return locked([](RankGroup& g) { return g.rank(); }); }); }
  int size() { return without_gil([&] { return locked([](RankGroup& g) { return g.size(); }); }); }

  void close() {
    without_gil([&] {
      std::unique_ptr<RankGroup> group;
      {
        std::lock_guard lock(mutex_);
        group = std::move(group_);
      }
    });
  }

  /// Runs `fn(RankGroup&)` under this group's lock; Usage error once closed.
  template <class Fn>
  auto locked(Fn&& fn) -> decltype(fn(std::declval<RankGroup&>())) {
    std::lock_guard lock(mutex_);
    if (!group_) fail(ErrorKind::Usage, "loadkit.RankGroup: the group is closed");
    return fn(*group_);
  }

 private:
  std::mutex mutex_;
  std::unique_ptr<RankGroup> group_;
};

/// One loaded model and the registry that served it.
class Engine {
 public:
  Engine(LoadOptions options, const std::vector<std::string>& plugin_dirs) {
    without_gil([&] {
      registry_ = std::make_unique<Registry>(Registry::search_path(plugin_dirs));
      model_ = LoadedModel::load(options, *registry_);
    });
  }

  at::Tensor logits(const std::vector<int64_t>& tokens) {
    return without_gil([&] { return locked([&](LoadedModel& m) { return m.logits(tokens); }); });
  }

  LoadReport reload(const std::string& path, bool process, bool journal) {
    const auto rollback = journal ? loadkit::Rollback::Journal : loadkit::Rollback::None;
    return without_gil([&] { return locked([&](LoadedModel& m) { return m.reload(path, process, rollback); }); });
  }

  void begin_update() {
    without_gil([&] { locked([](LoadedModel& m) { m.begin_update(); }); });
  }

  /// Inside begin_update()/finish_update(): one chunk, nothing returned. Outside: a whole
  /// update on its own, returning its report.
  std::optional<LoadReport> update(const Chunk& chunk) {
    std::vector<NamedWeight> weights;
    weights.reserve(chunk.size());
    for (const auto& [name, tensor] : chunk)
      weights.push_back({name, plain(name, tensor, "loadkit.Model.update"), "loadkit.Model.update"});
    std::vector<at::Tensor> released;  // declared before the call: dropped after it, with the GIL
    return without_gil([&] {
      return locked([&](LoadedModel& m) -> std::optional<LoadReport> {
        for (const auto& item : chunk) held_.push_back(item.second);
        SessionEnd end{m, held_, released};
        if (m.updating()) {
          const size_t first = held_.size() - chunk.size();
          try {
            m.update(weights);
          } catch (...) {
            // Still updating: the chunk was refused whole by validation, so nothing of it was
            // applied or kept, and its tensors are the caller's again now, not at finish_update().
            // (A failure past validation ends the session, and SessionEnd lets go of every chunk.)
            if (m.updating()) {
              released.insert(released.end(), std::make_move_iterator(held_.begin() + first),
                              std::make_move_iterator(held_.end()));
              held_.erase(held_.begin() + first, held_.end());
            }
            throw;
          }
          return std::nullopt;
        }
        m.begin_update();
        try {
          m.update(weights);
        } catch (...) {
          // The chunk was validated whole before anything was applied: after a validation failure
          // finishing puts every module back untouched. (A failure past validation has already
          // ended the session, and this finish only says so.) The first error is the one to report.
          try {
            m.finish_update();
          } catch (...) {
          }
          throw;
        }
        return m.finish_update();
      });
    });
  }

  LoadReport finish_update() {
    std::vector<at::Tensor> released;
    return without_gil([&] {
      return locked([&](LoadedModel& m) {
        SessionEnd end{m, held_, released};
        return m.finish_update();
      });
    });
  }

  LoadReport sync_fsdp_shards(Group& group, const Shards& shards, bool complete) {
    std::vector<LocalShard> locals;
    locals.reserve(shards.size());
    for (const auto& [name, local, full_shape] : shards)
      locals.push_back({name, plain(name, local, "loadkit.Model.sync_fsdp_shards"), full_shape});
    FsdpSyncOptions options;
    options.complete = complete;
    return without_gil([&] {
      return locked([&](LoadedModel& m) {
        return group.locked([&](RankGroup& g) { return loadkit::sync_fsdp_shards(m, *g.world(), locals, options); });
      });
    });
  }

  bool updating() {
    return without_gil([&] { return locked([](LoadedModel& m) { return m.updating(); }); });
  }

  LoadReport report() {
    return without_gil([&] { return locked([](LoadedModel& m) { return m.report(); }); });
  }

  std::vector<std::string> plugin_search_path() {
    return without_gil([&] { return locked([&](LoadedModel&) { return registry_->directories(); }); });
  }

  /// Frees the model (device memory included) and unloads its plugins, without the GIL; later
  /// calls are Usage errors. Waits for a call in progress on another thread.
  void close() {
    std::vector<at::Tensor> released;
    without_gil([&] {
      std::unique_ptr<LoadedModel> model;
      std::unique_ptr<Registry> registry;
      {
        std::lock_guard lock(mutex_);
        model = std::move(model_);
        registry = std::move(registry_);
        released = std::move(held_);
      }
      model.reset();  // before the plugins that made it
    });
  }

  bool closed() {
    return without_gil([&] {
      std::lock_guard lock(mutex_);
      return model_ == nullptr;
    });
  }

 private:
  /// Runs `fn(LoadedModel&)` under the model's lock (called without the GIL). Work that was
  /// waiting for the lock when the interpreter began to exit is not started.
  template <class Fn>
  auto locked(Fn&& fn) -> decltype(fn(std::declval<LoadedModel&>())) {
    std::lock_guard lock(mutex_);
    if (!model_) fail(ErrorKind::Usage, "loadkit.Model: the model is closed");
    if (calls::exiting()) fail(ErrorKind::Other, "loadkit: the interpreter is exiting; no new call is started");
    return fn(*model_);
  }

  /// Under the lock, at the end of a call that may end an update session: once it has ended,
  /// the caller's tensors held for it move to `released`, which the caller drops with the GIL.
  struct SessionEnd {
    LoadedModel& model;
    std::vector<at::Tensor>& held;
    std::vector<at::Tensor>& released;
    ~SessionEnd() {
      if (!model.updating()) {
        released.insert(released.end(), std::make_move_iterator(held.begin()), std::make_move_iterator(held.end()));
        held.clear();
      }
    }
  };

  // Declared first, destroyed last: every plugin stays loaded while the model lives.
  std::unique_ptr<Registry> registry_;
  std::unique_ptr<LoadedModel> model_;
  /// The caller's tensors of the update session in progress (the model may hold views of them
  /// until it ends): their last reference is never dropped under the lock.
  std::vector<at::Tensor> held_;
  std::mutex mutex_;
};

py::list plugins(const std::vector<std::string>& plugin_dirs) {
  std::vector<PluginInfo> found = without_gil([&] { return Registry(Registry::search_path(plugin_dirs)).plugins(); });
  py::list out;
  for (const PluginInfo& p : found) {
    py::dict d;
    d["path"] = os_str(p.path);
    d["name"] = os_str(p.name);
    d["version"] = os_str(p.version);
    d["abi_version"] = p.abi_version;
    d["sdk_version"] = os_str(p.sdk_version);
    d["torch_version"] = os_str(p.torch_version);
    d["architectures"] = os_strs(p.architectures);
    d["quant_methods"] = os_strs(p.quant_methods);
    d["status"] = os_str(p.status);
    out.append(d);
  }
  return out;
}

}  // namespace
}  // namespace loadkit::python

PYBIND11_MODULE(_loadkit, m) {
  using loadkit::python::Engine;
  using loadkit::python::Group;
  using loadkit::python::report_dict;
  namespace py = pybind11;
  namespace calls = loadkit::python::calls;
  m.doc() = "loadkit's C++ runtime; use the `loadkit` package (loadkit.Model), not this module.";
  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::string& path, const std::string& device, const std::string& dtype,
                       const std::string& quantization, const std::string& load_format,
                       const std::vector<std::string>& plugin_dirs, int tp_rank, int tp_size) {
             loadkit::LoadOptions options;
             options.model_dir = path;
             options.device = device;
             options.dtype = dtype;
             options.quantization = quantization;
             options.load_format = load_format;
             options.tp_rank = tp_rank;
             options.tp_size = tp_size;
             return std::make_unique<Engine>(std::move(options), plugin_dirs);
           }),
           py::arg("path"), py::arg("device"), py::arg("dtype"), py::arg("quantization"), py::arg("load_format"),
           py::arg("plugin_dirs"), py::arg("tp_rank"), py::arg("tp_size"))
      .def("logits", &Engine::logits, py::arg("tokens"))
      .def("reload",
           [](Engine& e, const std::string& path, bool process, bool journal) {
             return report_dict(e.reload(path, process, journal));
           },
           py::arg("path"), py::arg("process"), py::arg("journal"))
      .def("begin_update", &Engine::begin_update)
      .def("update", [](Engine& e, const loadkit::python::Chunk& chunk) -> py::object {
             auto report = e.update(chunk);
             return report ? py::object(report_dict(*report)) : py::object(py::none());
           }, py::arg("chunk"))
      .def("finish_update", [](Engine& e) { return report_dict(e.finish_update()); })
      .def("sync_fsdp_shards", [](Engine& e, Group& group, const loadkit::python::Shards& shards, bool complete) {
             return report_dict(e.sync_fsdp_shards(group, shards, complete));
           }, py::arg("group"), py::arg("shards"), py::arg("complete"))
      .def_property_readonly("updating", &Engine::updating)
      .def_property_readonly("report", [](Engine& e) { return report_dict(e.report()); })
      .def_property_readonly("plugin_search_path", [](Engine& e) {
        return loadkit::python::os_strs(e.plugin_search_path());
      })
      .def("close", &Engine::close)
      .def_property_readonly("closed", &Engine::closed);
  py::class_<Group>(m, "Group")
      .def(py::init<const std::string&, std::optional<int>>(), py::arg("device"), py::arg("master_port"))
      .def_property_readonly("rank", &Group::rank)
      .def_property_readonly("size", &Group::size)
      .def("close", &Group::close);
  m.def("plugins", &loadkit::python::plugins, py::arg("plugin_dirs"));
  m.def("set_log_level", [](const std::string& level) {
    loadkit::python::without_gil([&] { loadkit::log::set_level(loadkit::log::parse_level(level)); });
  }, py::arg("level"));
  m.def("_shutdown", &calls::shutdown, "atexit: waits for the calls in flight (see host_calls.h)");
  m.def("_after_fork_in_child", &calls::after_fork_in_child);
}
