// loadkit._loadkit: the runtime's C++ API (Registry, LoadedModel) for the Python
// package. loadkit/__init__.py is the documented interface; it hands this module
// arguments already normalised (strings, lists of (name, tensor) pairs).
//
// Every call that loads, copies or runs the model releases the GIL; calls on one
// model are serialised (LoadedModel is not thread-safe). Tensors cross the
// boundary through torch's own casters: the at::Tensor here is the caller's
// TensorImpl, same storage, no copy.

#include <torch/csrc/utils/pybind.h>  // pybind11 as torch ships it, torch.Tensor <-> at::Tensor

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/failure.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"

namespace loadkit::python {
namespace {

namespace py = pybind11;

using Chunk = std::vector<std::pair<std::string, at::Tensor>>;

/// Sets the Python exception for `failure` (loadkit._errors maps its kind to a class) and
/// unwinds to pybind11, which hands it to the caller.
[[noreturn]] void raise(const Failure& failure) {
  py::object type = py::module_::import("loadkit._errors").attr("error_type")(exit_code(failure.kind));
  PyErr_SetString(type.ptr(), failure.message.c_str());
  throw py::error_already_set();
}

/// Runs `work` without the GIL: it touches no Python object. A failure becomes
/// loadkit's Python exception, one line, no C++ backtrace. The message is taken
/// while whatever threw (a plugin's code included) is still loaded.
template <class Work>
auto without_gil(Work&& work) -> decltype(work()) {
  Failure failure;
  {
    py::gil_scoped_release release;
    try {
      return work();
    } catch (...) {
      failure = current_failure();
    }
  }
  raise(failure);
}

/// The caller's tensors as checkpoint weights: detached (no autograd), same storage.
std::vector<NamedWeight> as_weights(const Chunk& chunk) {
  std::vector<NamedWeight> weights;
  weights.reserve(chunk.size());
  for (const auto& [name, tensor] : chunk) weights.push_back({name, tensor.detach(), "loadkit.Model.update"});
  return weights;
}

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
    return without_gil([&] {
      std::lock_guard lock(mutex_);
      return model_->logits(tokens);
    });
  }

  std::string reload(const std::string& path, bool process) {
    return without_gil([&] {
      std::lock_guard lock(mutex_);
      return model_->reload(path, process).to_json();
    });
  }

  void begin_update() {
    without_gil([&] {
      std::lock_guard lock(mutex_);
      model_->begin_update();
    });
  }

  /// Inside begin_update()/finish_update(): one chunk, nothing returned. Outside: a whole
  /// update on its own, returning its report.
  std::optional<std::string> update(const Chunk& chunk) {
    return without_gil([&]() -> std::optional<std::string> {
      std::lock_guard lock(mutex_);
      const std::vector<NamedWeight> weights = as_weights(chunk);
      if (model_->updating()) {
        model_->update(weights);
        return std::nullopt;
      }
      model_->begin_update();
      try {
        model_->update(weights);
      } catch (...) {
        // The chunk was validated whole before anything was applied: after a validation failure
        // finishing puts every module back untouched. (A failure past validation has already
        // ended the session, and this finish only says so.) The first error is the one to report.
        try {
          model_->finish_update();
        } catch (...) {
        }
        throw;
      }
      return model_->finish_update().to_json();
    });
  }

  std::string finish_update() {
    return without_gil([&] {
      std::lock_guard lock(mutex_);
      return model_->finish_update().to_json();
    });
  }

  bool updating() {
    std::lock_guard lock(mutex_);
    return model_->updating();
  }

  std::string report() {
    std::lock_guard lock(mutex_);
    return model_->report().to_json();
  }

  std::vector<std::string> plugin_search_path() const { return registry_->directories(); }

 private:
  // Declared first, destroyed last: every plugin stays loaded while the model lives.
  std::unique_ptr<Registry> registry_;
  std::unique_ptr<LoadedModel> model_;
  std::mutex mutex_;
};

}  // namespace
}  // namespace loadkit::python

PYBIND11_MODULE(_loadkit, m) {
  using loadkit::python::Engine;
  namespace py = pybind11;
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
      .def("reload", &Engine::reload, py::arg("path"), py::arg("process"))
      .def("begin_update", &Engine::begin_update)
      .def("update", &Engine::update, py::arg("chunk"))
      .def("finish_update", &Engine::finish_update)
      .def_property_readonly("updating", &Engine::updating)
      .def_property_readonly("report", &Engine::report)
      .def_property_readonly("plugin_search_path", &Engine::plugin_search_path);
  m.def("set_log_level", [](const std::string& level) {
    loadkit::python::without_gil([&] { loadkit::log::set_level(loadkit::log::parse_level(level)); });
  }, py::arg("level"));
}
