// loadkit inspect: what a checkpoint holds and who would load it. Reads headers only.

#include <filesystem>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "formats/checkpoint_files.h"
#include "loadkit/error.h"
#include "loadkit/model_config.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
#include "output.h"

namespace loadkit::cli {

namespace {
std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}
}  // namespace

int inspect(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string model;
  bool json = false;
  po::options_description desc("inspect");
  add_plugin_dirs(desc, common);
  desc.add_options()
      ("model", po::value(&model)->required(), "checkpoint directory")
      ("json", po::bool_switch(&json), "machine-readable output");
  if (!parse("inspect", args, desc, common)) return 0;

  std::error_code ec;
  if (!std::filesystem::is_directory(model, ec)) fail(ErrorKind::Input, model, ": model directory does not exist");
  const ModelConfig config = ModelConfig::from_file((std::filesystem::path(model) / "config.json").string());
  const auto architectures = config.get_strings("architectures");
  if (architectures.empty()) fail(ErrorKind::Input, config.origin(), ": 'architectures' is empty");
  const auto files = safetensors::open_checkpoint(model);
  Registry registry(Registry::search_path(common.plugin_dirs));
  const std::string plugin = registry.serves(architectures[0]) ? registry.provider(architectures[0]).path : "";

  if (json) {
    nlohmann::ordered_json tensors = nlohmann::ordered_json::array();
    for (const auto& f : files.files)
      for (const auto& t : f->tensors())
        tensors.push_back({{"name", t.name}, {"dtype", safetensors::dtype_name(t.dtype)}, {"shape", t.shape},
                           {"bytes", t.bytes()}, {"file", std::filesystem::path(f->path()).filename().string()}});
    nlohmann::ordered_json out{{"model", model},
                               {"architecture", architectures[0]},
                               {"plugin", plugin.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(plugin)},
                               {"files", files.files.size()},
                               {"index", files.index_path},
                               {"tensors", files.total_tensors},
                               {"bytes", files.total_bytes},
                               {"ignored_files", files.ignored_files},
                               {"tensor_list", tensors}};
    std::cout << json_text(out) << "\n";
    return 0;
  }
  std::cout << "model:        " << model << "\n"
            << "architecture: " << architectures[0] << "\n"
            << "plugin:       " << (plugin.empty() ? "none serves it (see 'loadkit plugins list')" : plugin) << "\n"
            << "files:        " << files.files.size() << (files.index_path.empty() ? "" : " (with index)") << "\n"
            << "tensors:      " << files.total_tensors << ", " << files.total_bytes << " bytes\n";
  if (!files.ignored_files.empty()) std::cout << "ignored:      " << join(files.ignored_files) << " (model.safetensors is read alone)\n";
  std::cout << "\n";
  for (const auto& f : files.files) {
    std::cout << std::filesystem::path(f->path()).filename().string() << "\n";
    for (const auto& t : f->tensors())
      std::cout << "  " << std::left << std::setw(56) << t.name << " " << std::setw(8) << safetensors::dtype_name(t.dtype)
                << " " << std::setw(18) << shape_text(t.shape) << " " << t.bytes() << "\n";
  }
  return 0;
}

}  // namespace loadkit::cli
