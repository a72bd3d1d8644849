#pragma once
/// \file
/// Finds plugins in directories, checks them before use, and serves
/// architectures and quantization methods from them.
///
/// Search order: directories given explicitly (`--plugin-dir`, in order), then
/// `LOADKIT_PLUGIN_PATH` (colon-separated), then the default directory next to
/// the runtime library (`<prefix>/lib/loadkit/plugins`, whichever program
/// hosts it: the CLI, Python). Within a directory, files
/// `*.so` in name order. Each library is checked in a fixed order — open (a
/// readable regular file), ELF (complete and of this machine, before `dlopen`
/// maps it), load, entry symbol, ABI version, SDK major, torch version, C++
/// ABI, registration — and a failure marks it broken with the reason; it never
/// stops the others. World-writable plugin directories and files are warned
/// about: a plugin is trusted code, run inside the host process.
/// The first plugin to claim an architecture serves it; later claimants are
/// reported as shadowed. Every model or quantization config a plugin creates
/// keeps that plugin's library loaded for as long as it lives.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace loadkit {

class CausalLM;
class QuantConfig;
struct ModelContext;

struct PluginInfo {
  std::string path;
  std::string name;     ///< empty when the descriptor could not be read
  std::string version;
  uint32_t abi_version = 0;
  std::string sdk_version;
  std::string torch_version;
  std::string cxx_abi;
  std::string compiler;
  std::vector<std::string> architectures;
  std::vector<std::string> quant_methods;
  /// "ok", "broken: <reason>" or "shadowed by <file>".
  std::string status;
  /// Names this plugin claims that an earlier plugin serves: name → that plugin's file.
  std::map<std::string, std::string> shadowed;
  bool ok() const { return status.rfind("broken", 0) != 0; }
};

class Registry {
 public:
  /// Explicit directories, then LOADKIT_PLUGIN_PATH, then the default directory.
  static std::vector<std::string> search_path(const std::vector<std::string>& explicit_dirs);

  explicit Registry(const std::vector<std::string>& directories);
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  const std::vector<std::string>& directories() const;
  const std::vector<PluginInfo>& plugins() const;
  bool serves(const std::string& architecture) const;
  /// The plugin that serves `architecture`; Plugin error (exit 4) naming what was searched if none.
  const PluginInfo& provider(const std::string& architecture) const;

  /// Builds a model; Plugin error (exit 4) when no plugin serves the architecture.
  std::shared_ptr<CausalLM> create_model(const std::string& architecture, const ModelContext& ctx) const;
  /// Makes a quantization config; Plugin error when no plugin provides `name`.
  std::shared_ptr<QuantConfig> create_quant(const std::string& name, const ModelContext& ctx) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace loadkit
