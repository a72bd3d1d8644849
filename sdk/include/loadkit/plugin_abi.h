#pragma once
/// \file
/// The whole binary contract between the loadkit host and a plugin library.
///
/// A plugin exports exactly one symbol, `LOADKIT_PLUGIN_ENTRY` (today
/// `loadkit_plugin_v1`: the name carries the ABI generation), an `extern "C"`
/// function returning a pointer to a static `loadkit_plugin_descriptor`. The
/// host opens the library, looks the symbol up, checks `abi_version`, the SDK
/// major version, the torch version and the C++ ABI tag — in that order — and
/// only then calls `register_plugin`. No C++ exception crosses this boundary:
/// `register_plugin` reports failure through its return value and message
/// buffer. Use `LOADKIT_PLUGIN` from `loadkit/plugin.h` rather than filling the
/// struct by hand.
///
/// What the factories a plugin registers may do once called (throwing
/// `loadkit::Error`, threading, ownership, lifetime) is the C++ layer's
/// contract: see `loadkit/plugin.h`.
///
/// Lifetime of the library: the host keeps it loaded while its registry lives
/// and, past that, while any object the plugin made (a model, a quantization
/// config) is alive. It may open the same file several times in one process
/// (each registry opens its own handle), and may unload it as soon as the last
/// of those is gone — nothing the plugin returned may be used after that.

#include <stddef.h>
#include <stdint.h>

/// Layout version of `loadkit_plugin_descriptor`.
///
/// Bump rule: increment whenever a field is removed, reordered or changes
/// meaning, or a field is appended that the host must use (then also rename the
/// entry symbol, `LOADKIT_PLUGIN_ENTRY`, to `loadkit_plugin_v<N>`).
/// `abi_version` always stays the first field so that any host can read it
/// from any plugin.
#define LOADKIT_PLUGIN_ABI_VERSION 1

/// The entry function's name, as a token: the one place it is spelled.
/// `LOADKIT_PLUGIN` defines a function of this name; the host looks up
/// `LOADKIT_PLUGIN_ENTRY_SYMBOL`, the same name as a string.
#define LOADKIT_PLUGIN_ENTRY loadkit_plugin_v1

#define LOADKIT_STRINGIFY_IMPL(x) #x
/// `x` after macro expansion, as a string literal.
#define LOADKIT_STRINGIFY(x) LOADKIT_STRINGIFY_IMPL(x)

/// Name of the one exported entry function, as the host looks it up.
#define LOADKIT_PLUGIN_ENTRY_SYMBOL LOADKIT_STRINGIFY(LOADKIT_PLUGIN_ENTRY)

#ifdef __cplusplus
extern "C" {
#endif

/// Opaque handle to the host's registrar; a C++ plugin sees it as `loadkit::Registrar&`.
typedef struct loadkit_registrar loadkit_registrar;

/// Called by the host after every version check passed, once per opening of
/// the library (a process that builds two registries calls it twice).
///
/// Adds the plugin's architectures and quantization methods to `registrar`.
/// Returns 0 on success; otherwise writes a NUL-terminated one-line reason
/// (at most `error_len` bytes) into `error` and returns non-zero, in which case
/// nothing it registered is used. Must not throw.
///
/// Threading: called on the thread that builds the registry; registries may
/// be built on several threads at once, so registration must not touch
/// mutable state shared between calls. Ownership: `registrar` belongs to the
/// host and is valid only during the call; what is registered is copied.
typedef int (*loadkit_register_fn)(loadkit_registrar* registrar, char* error, size_t error_len);

/// What a plugin says about itself. Static storage; every string NUL-terminated UTF-8.
typedef struct loadkit_plugin_descriptor {
  uint32_t abi_version;        ///< LOADKIT_PLUGIN_ABI_VERSION the plugin was built with. Always first.
  uint32_t sdk_version_major;  ///< LOADKIT_VERSION_MAJOR the plugin was built with (must equal the host's).
  uint32_t sdk_version_minor;  ///< informational
  uint32_t sdk_version_patch;  ///< informational
  const char* torch_version;   ///< TORCH_VERSION the plugin was compiled against (must equal the host's).
  const char* cxx_abi_tag;     ///< e.g. "libstdc++ cxx11abi=1" (must equal the host's).
  const char* compiler;        ///< e.g. "gcc 12.2.0" (informational).
  const char* name;            ///< plugin name, e.g. "llama"
  const char* version;         ///< plugin version, e.g. "1.0.0"
  loadkit_register_fn register_plugin;  ///< see loadkit_register_fn; never null
} loadkit_plugin_descriptor;

/// Signature of the entry symbol. Must not throw; may be called several
/// times, from any thread, and returns the same descriptor each time. The
/// descriptor lives as long as the library stays loaded.
typedef const loadkit_plugin_descriptor* (*loadkit_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif
