// loadkit plugins list

#include <iostream>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
#include "output.h"

namespace loadkit::cli {

int plugins_list(const std::vector<std::string>& args) {
  CommonOptions common;
  bool json = false;
  po::options_description desc("plugins list");
  add_plugin_dirs(desc, common);
  desc.add_options()("json", po::bool_switch(&json), "machine-readable output");
  if (!parse("plugins list", args, desc, common)) return 0;

  Registry registry(Registry::search_path(common.plugin_dirs));
  if (json) {
    nlohmann::ordered_json out = nlohmann::ordered_json::array();
    for (const auto& p : registry.plugins()) {
      out.push_back({{"file", p.path},
                     {"name", p.name},
                     {"version", p.version},
                     {"architectures", p.architectures},
                     {"quantization_methods", p.quant_methods},
                     {"sdk_version", p.sdk_version},
                     {"abi_version", p.abi_version},
                     {"torch_version", p.torch_version},
                     {"cxx_abi", p.cxx_abi},
                     {"compiler", p.compiler},
                     {"status", p.status},
                     {"shadowed", p.shadowed}});
    }
    std::cout << json_text(nlohmann::ordered_json{{"search_path", registry.directories()}, {"plugins", out}}) << "\n";
    return 0;
  }
  std::cout << "search path: " << join(registry.directories()) << "\n";
  if (registry.plugins().empty()) std::cout << "no plugins found\n";
  for (const auto& p : registry.plugins()) {
    std::cout << p.path << "\n  status:        " << p.status << "\n";
    if (p.name.empty()) continue;
    std::cout << "  plugin:        " << p.name << " " << p.version << "\n"
              << "  architectures: " << join(p.architectures) << "\n"
              << "  quantization:  " << join(p.quant_methods) << "\n"
              << "  built with:    sdk " << p.sdk_version << ", abi " << p.abi_version << ", torch " << p.torch_version
              << ", " << p.cxx_abi << ", " << p.compiler << "\n";
  }
  return 0;
}

}  // namespace loadkit::cli
