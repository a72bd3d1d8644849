#pragma once
/// \file
/// Writing a plugin: implement a registration function and name it in `LOADKIT_PLUGIN`.
///
/// \code
/// static void register_llama(loadkit::Registrar& r) {
///   r.add_architecture("LlamaForCausalLM", [](const loadkit::ModelContext& ctx) { ... });
/// }
/// LOADKIT_PLUGIN("llama", "1.0.0", register_llama)
/// \endcode
///
/// The macro defines the one exported entry symbol (`LOADKIT_PLUGIN_ENTRY`,
/// see plugin_abi.h) with the versions this translation unit was compiled
/// against, and a registration hook that turns any exception into an error
/// value so that none crosses into the host. Build with hidden visibility
/// (`loadkit_add_plugin` does) so that only the entry symbol is exported.
///
/// ## The hook contract
///
/// Past registration, the host calls the plugin's C++ code directly: the
/// factories it registered and the objects they return (`CausalLM`,
/// `QuantConfig`, `LinearMethod`, `FusedMoEMethod`). That is safe because the
/// registry checked, before registering anything, that both sides were built
/// against the same SDK major, torch and C++ ABI. Every hook follows these rules.
///
/// **Errors.** A hook reports failure by throwing, and only:
///  - `loadkit::Error` (`fail(kind, …)`), with the kind that says whose fault it
///    is: `Input` for a config or checkpoint it cannot serve (name the file and
///    the key or tensor), `Usage` for an option it cannot honour (a tensor
///    parallel size that does not divide the heads), `Other` for the rest;
///  - libtorch's (`c10::Error`, from `TORCH_CHECK`) and the standard library's
///    exceptions, which the host reports as `Other`.
/// Never an exception type of the plugin's own: its vtable lives in the
/// plugin, and the host may catch it after unloading the library (error.h
/// says why `loadkit::Error` is safe). A failed hook leaves no obligation: the
/// host drops whatever the call was building.
///
/// **Threading.** The host calls one model's hooks (its forward, its loaders,
/// its modules' processing) from one thread at a time; different models, and
/// factories building them, may run on different threads at once. Keep
/// per-model state in the model, and nothing mutable in globals.
///
/// **Ownership and lifetime.** A factory's `ModelContext` is valid for the
/// call only: copy what you keep (the SDK's layers do). What a factory
/// returns is owned by the host through its `shared_ptr`; the host keeps the
/// plugin's library loaded for as long as that object, or anything holding it,
/// lives. The objects a model owns (modules, parameters, weight loaders,
/// quantization methods) live and die with it; the host may keep a copy of a
/// parameter's weight loader, always for less long than the model.
///
/// The per-hook details — when each is called and what it may assume — are
/// next to each hook: `Registrar` below, `ArchitectureFactory` and `CausalLM`
/// in causal_lm.h, `QuantConfig` and `LinearMethod` in quant_method.h,
/// `FusedMoEMethod` in layers/fused_moe.h.

#include <torch/version.h>

#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <string>

#include "loadkit/causal_lm.h"
#include "loadkit/plugin_abi.h"
#include "loadkit/quant_method.h"
#include "loadkit/version.h"

namespace loadkit {

/// Makes a quantization config for a model being loaded; `ctx.quant` is not yet
/// set. Called once per load that asks for this method (`--quantization name`),
/// before the model is built, on the loading thread. May throw `loadkit::Error`
/// (e.g. `Usage` for a device the method cannot run on).
using QuantFactory = std::function<std::shared_ptr<QuantConfig>(const ModelContext& ctx)>;

/// The host's side of registration. Valid only during the registration hook:
/// do not keep a reference. Each name may be added once per plugin; a name
/// another plugin added first is served by that one (this one is then listed
/// as shadowed). The factories are copied and called later, as described above.
class Registrar {
 public:
  virtual ~Registrar() = default;
  /// Serve `architecture` (the `architectures[0]` string of config.json).
  virtual void add_architecture(const std::string& architecture, ArchitectureFactory factory) = 0;
  /// Provide the quantization method `name` (as in `--quantization name`).
  virtual void add_quant_method(const std::string& name, QuantFactory factory) = 0;
};

namespace detail {
inline int call_register(void (*fn)(Registrar&), loadkit_registrar* registrar, char* error, size_t error_len) noexcept {
  auto report = [&](const char* what) {
    if (error && error_len) {
      std::strncpy(error, what, error_len - 1);
      error[error_len - 1] = '\0';
    }
    return 1;
  };
  try {
    fn(*reinterpret_cast<Registrar*>(registrar));
    return 0;
  } catch (const std::exception& e) {
    return report(e.what());
  } catch (...) {
    return report("unknown exception during registration");
  }
}
}  // namespace detail

}  // namespace loadkit

/// The C++ standard library ABI of this translation unit.
#define LOADKIT_CXX_ABI_TAG "libstdc++ cxx11abi=" LOADKIT_STRINGIFY(_GLIBCXX_USE_CXX11_ABI)
#if defined(__clang__)
#define LOADKIT_COMPILER "clang " __clang_version__
#else
#define LOADKIT_COMPILER "gcc " __VERSION__
#endif

/// Defines the plugin's entry symbol (`LOADKIT_PLUGIN_ENTRY`). NAME and VERSION
/// are string literals; REGISTER is a `void(loadkit::Registrar&)` function, run
/// on every opening of the library (see `loadkit_register_fn`): anything it
/// throws becomes the registration's error value, one line.
#define LOADKIT_PLUGIN(NAME, VERSION, REGISTER)                                                               \
  extern "C" __attribute__((visibility("default"))) const loadkit_plugin_descriptor* LOADKIT_PLUGIN_ENTRY() { \
    static const loadkit_plugin_descriptor descriptor = {                                                     \
        LOADKIT_PLUGIN_ABI_VERSION,                                                                           \
        LOADKIT_VERSION_MAJOR,                                                                                \
        LOADKIT_VERSION_MINOR,                                                                                \
        LOADKIT_VERSION_PATCH,                                                                                \
        TORCH_VERSION,                                                                                        \
        LOADKIT_CXX_ABI_TAG,                                                                                  \
        LOADKIT_COMPILER,                                                                                     \
        NAME,                                                                                                 \
        VERSION,                                                                                              \
        [](loadkit_registrar* registrar, char* error, size_t error_len) noexcept -> int {                     \
          return ::loadkit::detail::call_register(REGISTER, registrar, error, error_len);                     \
        }};                                                                                                   \
    return &descriptor;                                                                                       \
  }
