#include "loadkit/runtime/registry.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <algorithm>
#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <filesystem>
#include <variant>

#include "elf_check.h"
#include "formats/regular_file.h"
#include "loadkit/error.h"
#include "loadkit/notes.h"
#include "loadkit/plugin.h"
#include "loadkit/runtime/log.h"

namespace loadkit {

namespace fs = std::filesystem;
using Library = std::shared_ptr<boost::dll::shared_library>;

namespace {

/// Collects what one plugin registers; merged into the registry only if registration succeeds.
class CollectingRegistrar final : public Registrar {
 public:
  void add_architecture(const std::string& architecture, ArchitectureFactory factory) override {
    architectures.emplace_back(architecture, std::move(factory));
  }
  void add_quant_method(const std::string& name, QuantFactory factory) override {
    quant_methods.emplace_back(name, std::move(factory));
  }
  std::vector<std::pair<std::string, ArchitectureFactory>> architectures;
  std::vector<std::pair<std::string, QuantFactory>> quant_methods;
};

std::string version_string(uint32_t major, uint32_t minor, uint32_t patch) { return cat(major, ".", minor, ".", patch); }

const std::string& host_sdk_version() {
  static const std::string v = version_string(LOADKIT_VERSION_MAJOR, LOADKIT_VERSION_MINOR, LOADKIT_VERSION_PATCH);
  return v;
}

/// A function of this library (internal linkage, so no other library's copy stands in for it).
void runtime_library_anchor() {}

std::string first_line(std::string s) {
  if (auto nl = s.find('\n'); nl != std::string::npos) s.resize(nl);
  return s;
}

}  // namespace

struct Registry::Impl {
  // Order matters for destruction: factories (code inside the libraries) go before the libraries.
  std::vector<Library> libraries;
  std::vector<std::string> directories;
  std::vector<PluginInfo> plugins;
  struct ArchEntry {
    ArchitectureFactory factory;
    Library library;
    size_t plugin;
  };
  struct QuantEntry {
    QuantFactory factory;
    Library library;
    size_t plugin;
  };
  std::map<std::string, ArchEntry> architectures;
  std::map<std::string, QuantEntry> quant_methods;

  ~Impl() {
    architectures.clear();
    quant_methods.clear();
  }

  void scan(const std::string& dir);
  void load(const fs::path& path);
};

std::vector<std::string> Registry::search_path(const std::vector<std::string>& explicit_dirs) {
  std::vector<std::string> dirs = explicit_dirs;
  if (const char* env = std::getenv("LOADKIT_PLUGIN_PATH")) {
    std::string value = env;
    size_t start = 0;
    while (start <= value.size()) {
      size_t end = value.find(':', start);
      if (end == std::string::npos) end = value.size();
      if (end > start) dirs.push_back(value.substr(start, end - start));
      start = end + 1;
    }
  }
  // <prefix>/lib/libloadkit_runtime.so → <prefix>/lib/loadkit/plugins, in the build tree as in an
  // install. Found from this library, not from the executable: a host such as Python
  // (/usr/bin/python3) lives elsewhere.
  std::error_code ec;
  fs::path runtime = boost::dll::symbol_location(runtime_library_anchor, ec);
  if (!ec) dirs.push_back((runtime.parent_path() / "loadkit" / "plugins").lexically_normal().string());
  // A directory named twice is searched once, where it first appears.
  std::vector<std::string> unique;
  std::vector<fs::path> seen;
  for (const auto& d : dirs) {
    fs::path key = fs::weakly_canonical(d, ec);
    if (ec) key = fs::path(d).lexically_normal();
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) continue;
    seen.push_back(key);
    unique.push_back(d);
  }
  return unique;
}

Registry::Registry(const std::vector<std::string>& directories) : impl_(std::make_unique<Impl>()) {
  impl_->directories = directories;
  for (const auto& dir : directories) impl_->scan(dir);
}

Registry::~Registry() = default;

void Registry::Impl::scan(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (ec)  // e.g. the directory is a symlink loop: say so, it is not merely absent
      log::warn(cat("plugin directory ", dir, ": cannot access: ", ec.message()));
    else
      log::debug(cat("plugin directory ", dir, " does not exist"));
    return;
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) == 0 && (st.st_mode & S_IWOTH))
    log::warn(cat("plugin directory ", dir, " is writable by every user: anyone on this machine can add code that loadkit runs"));
  // increment(ec), not range-for: a read error mid-listing must not throw out of the scan.
  std::vector<fs::path> files;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".so") files.push_back(it->path());
  if (ec) log::warn(cat("plugin directory ", dir, ": cannot list: ", ec.message()));
  std::sort(files.begin(), files.end());
  for (const auto& file : files) load(file);
}

void Registry::Impl::load(const fs::path& path) {
  PluginInfo info;
  info.path = path.string();
  auto broken = [&](const std::string& reason) {
    info.status = "broken: " + reason;
    log::warn(cat("plugin ", info.path, ": ", reason));
    plugins.push_back(info);
  };

  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    if (!ec) return broken("not a regular file");
    // A symlink loop (ELOOP) or a dangling link (ENOENT): name where the link points.
    std::error_code not_link;
    const fs::path target = fs::read_symlink(path, not_link);
    return broken(not_link ? cat("cannot open: ", ec.message())
                           : cat("cannot open: symlink to '", target.string(), "': ", ec.message()));
  }

  // 1. open: a regular file this process can read (a FIFO named *.so must not block the scan).
  {
    auto opened = RegularFile::try_open(info.path);
    if (auto* why = std::get_if<std::string>(&opened)) return broken(cat("cannot open: ", *why));
    const RegularFile& file = std::get<RegularFile>(opened);
    if (file.mode() & S_IWOTH)
      log::warn(cat("plugin ", info.path, " is writable by every user: anyone on this machine can change the code loadkit runs"));
    // 2. ELF: complete and of this machine, before dlopen maps it (elf_check.h says why).
    // A file that is no ELF file at all goes on to dlopen, which reads (does not map) its header
    // and refuses it in its own words ("invalid ELF header").
    if (auto problem = elf_problem(file.fd(), file.size()); problem && problem->is_elf) return broken(problem->what);
  }
  // 3. load
  Library library;
  try {
    library = std::make_shared<boost::dll::shared_library>(
        path, boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& e) {
    // Boost's error drops dlerror()'s detail ("invalid ELF header", a missing
    // dependency); ask the loader once more for the reason.
    std::string why = e.what();
    if (void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      dlclose(handle);
    } else if (const char* detail = dlerror()) {
      why = detail;
    }
    return broken(cat("cannot open: ", first_line(why)));
  }
  // 4. entry symbol
  if (!library->has(LOADKIT_PLUGIN_ENTRY_SYMBOL))
    return broken(cat("no entry symbol '", LOADKIT_PLUGIN_ENTRY_SYMBOL, "' (not a loadkit plugin of this ABI)"));
  auto entry = library->get<const loadkit_plugin_descriptor*()>(LOADKIT_PLUGIN_ENTRY_SYMBOL);
  const loadkit_plugin_descriptor* d = entry();
  if (!d) return broken("entry symbol returned no descriptor");
  // 5. versions, each naming both sides
  info.abi_version = d->abi_version;
  if (d->abi_version != LOADKIT_PLUGIN_ABI_VERSION)
    return broken(cat("Wrong ABI version on plugin '", path.filename().string(), "'. Got ", d->abi_version,
                      ", supported ", LOADKIT_PLUGIN_ABI_VERSION, "."));
  info.name = d->name ? d->name : "";
  info.version = d->version ? d->version : "";
  info.sdk_version = version_string(d->sdk_version_major, d->sdk_version_minor, d->sdk_version_patch);
  info.torch_version = d->torch_version ? d->torch_version : "";
  info.cxx_abi = d->cxx_abi_tag ? d->cxx_abi_tag : "";
  info.compiler = d->compiler ? d->compiler : "";
  if (d->sdk_version_major != LOADKIT_VERSION_MAJOR)
    return broken(cat("Wrong SDK version on plugin '", path.filename().string(), "'. Got ", info.sdk_version,
                      ", host has ", host_sdk_version(), " (major versions must match)."));
  if (info.torch_version != TORCH_VERSION)
    return broken(cat("Wrong torch version on plugin '", path.filename().string(), "'. Got ", info.torch_version,
                      ", host has ", TORCH_VERSION, "."));
  if (info.cxx_abi != LOADKIT_CXX_ABI_TAG)
    return broken(cat("Wrong C++ ABI on plugin '", path.filename().string(), "'. Got '", info.cxx_abi,
                      "', host has '", LOADKIT_CXX_ABI_TAG, "'."));
  if (!d->register_plugin) return broken("descriptor has no registration hook");
  // 6. registration hook
  CollectingRegistrar registrar;
  char error[512] = {0};
  if (d->register_plugin(reinterpret_cast<loadkit_registrar*>(static_cast<Registrar*>(&registrar)), error,
                         sizeof error) != 0)
    return broken(cat("registration failed: ", error[0] ? first_line(error) : "no reason given"));

  const size_t index = plugins.size();
  info.status = "ok";
  for (auto& [name, factory] : registrar.architectures) {
    info.architectures.push_back(name);
    auto it = architectures.find(name);
    if (it != architectures.end()) {
      info.shadowed[name] = plugins[it->second.plugin].path;
      continue;
    }
    architectures.emplace(name, ArchEntry{std::move(factory), library, index});
  }
  for (auto& [name, factory] : registrar.quant_methods) {
    info.quant_methods.push_back(name);
    auto it = quant_methods.find(name);
    if (it != quant_methods.end()) {
      info.shadowed[name] = plugins[it->second.plugin].path;
      continue;
    }
    quant_methods.emplace(name, QuantEntry{std::move(factory), library, index});
  }
  if (!info.shadowed.empty()) info.status = "shadowed by " + info.shadowed.begin()->second;
  libraries.push_back(library);
  plugins.push_back(std::move(info));
}

const std::vector<std::string>& Registry::directories() const { return impl_->directories; }
const std::vector<PluginInfo>& Registry::plugins() const { return impl_->plugins; }
bool Registry::serves(const std::string& architecture) const { return impl_->architectures.count(architecture) > 0; }

namespace {

/// What was searched, for "nothing serves X" messages.
std::string searched(const Registry& registry) {
  std::string dirs;
  for (const auto& d : registry.directories()) dirs += (dirs.empty() ? "" : ", ") + d;
  std::string broken;
  for (const auto& p : registry.plugins())
    if (!p.ok()) broken += cat("; ", fs::path(p.path).filename().string(), " is ", p.status);
  return cat("searched ", dirs.empty() ? "no directories" : dirs, broken);
}

/// Keeps `library` loaded for as long as `object` lives.
template <class T>
std::shared_ptr<T> keep_loaded(std::shared_ptr<T> object, const Library& library) {
  struct Holder {
    Library library;  // destroyed last
    std::shared_ptr<T> object;
  };
  auto holder = std::make_shared<Holder>(Holder{library, object});
  return std::shared_ptr<T>(holder, holder->object.get());
}

/// Logs, when the call into the plugin it guards returns or throws, what the plugin noted
/// meanwhile (loadkit/notes.h).
struct LogNotes {
  ~LogNotes() {
    for (const auto& n : take_notes()) log::info(n);
  }
};

}  // namespace

const PluginInfo& Registry::provider(const std::string& architecture) const {
  auto it = impl_->architectures.find(architecture);
  if (it == impl_->architectures.end())
    fail(ErrorKind::Plugin, "no plugin serves architecture '", architecture, "' (", searched(*this), ")");
  return impl_->plugins[it->second.plugin];
}

std::shared_ptr<CausalLM> Registry::create_model(const std::string& architecture, const ModelContext& ctx) const {
  auto it = impl_->architectures.find(architecture);
  if (it == impl_->architectures.end())
    fail(ErrorKind::Plugin, "no plugin serves architecture '", architecture, "' (", searched(*this), ")");
  LogNotes notes;
  auto model = it->second.factory(ctx);
  if (!model) fail(ErrorKind::Plugin, "plugin ", impl_->plugins[it->second.plugin].path, " built no model for '", architecture, "'");
  assign_quant_methods(*model, ctx);  // per-layer methods, now that every layer has its name
  return keep_loaded(std::move(model), it->second.library);
}

std::shared_ptr<QuantConfig> Registry::create_quant(const std::string& name, const ModelContext& ctx) const {
  auto it = impl_->quant_methods.find(name);
  if (it == impl_->quant_methods.end())
    fail(ErrorKind::Plugin, "no plugin provides quantization method '", name, "' (", searched(*this), ")");
  LogNotes notes;
  auto quant = it->second.factory(ctx);
  if (!quant) fail(ErrorKind::Plugin, "plugin ", impl_->plugins[it->second.plugin].path, " made no quantization config '", name, "'");
  return keep_loaded(std::move(quant), it->second.library);
}

}  // namespace loadkit
