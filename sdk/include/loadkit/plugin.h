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
/// The macro defines the one exported entry symbol (`loadkit_plugin_v1`) with
/// the versions this translation unit was compiled against, and a
/// registration hook that turns any exception into an error value so that none
/// crosses into the host. Build with hidden visibility (`loadkit_add_plugin`
/// does) so that only the entry symbol is exported.

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

/// Makes a quantization config for a model; `ctx.quant` is not yet set.
using QuantFactory = std::function<std::shared_ptr<QuantConfig>(const ModelContext& ctx)>;

/// The host's side of registration. Valid only during the registration hook.
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

#define LOADKIT_STRINGIFY_IMPL(x) #x
#define LOADKIT_STRINGIFY(x) LOADKIT_STRINGIFY_IMPL(x)
/// The C++ standard library ABI of this translation unit.
#define LOADKIT_CXX_ABI_TAG "libstdc++ cxx11abi=" LOADKIT_STRINGIFY(_GLIBCXX_USE_CXX11_ABI)
#if defined(__clang__)
#define LOADKIT_COMPILER "clang " __clang_version__
#else
#define LOADKIT_COMPILER "gcc " __VERSION__
#endif

/// Defines the plugin's entry symbol. NAME and VERSION are string literals;
/// REGISTER is a `void(loadkit::Registrar&)` function.
#define LOADKIT_PLUGIN(NAME, VERSION, REGISTER)                                                         \
  extern "C" __attribute__((visibility("default"))) const loadkit_plugin_descriptor* loadkit_plugin_v1() { \
    static const loadkit_plugin_descriptor descriptor = {                                              \
        LOADKIT_PLUGIN_ABI_VERSION,                                                                    \
        LOADKIT_VERSION_MAJOR,                                                                         \
        LOADKIT_VERSION_MINOR,                                                                         \
        LOADKIT_VERSION_PATCH,                                                                         \
        TORCH_VERSION,                                                                                 \
        LOADKIT_CXX_ABI_TAG,                                                                           \
        LOADKIT_COMPILER,                                                                              \
        NAME,                                                                                          \
        VERSION,                                                                                       \
        [](loadkit_registrar* registrar, char* error, size_t error_len) noexcept -> int {              \
          return ::loadkit::detail::call_register(REGISTER, registrar, error, error_len);              \
        }};                                                                                            \
    return &descriptor;                                                                                \
  }
