#include "options.h"

#include <iostream>

#include "jobs/output_guard.h"
#include "loadkit/error.h"
#include "loadkit/runtime/log.h"

namespace loadkit::cli {

void add_plugin_dirs(po::options_description& desc, CommonOptions& common) {
  desc.add_options()
      ("plugin-dir", po::value(&common.plugin_dirs)->composing(), "plugin directory, searched first (repeatable)")
      ("log-level", po::value(&common.log_level)->default_value("info"), "trace|debug|info|warn|error");
}

void add_common(po::options_description& desc, CommonOptions& common) {
  add_plugin_dirs(desc, common);
  LoadOptions& load = common.load;
  desc.add_options()
      ("device", po::value(&load.device)->default_value("cpu"), "cpu|cuda|cuda:N")
      ("dtype", po::value(&load.dtype)->default_value("auto"), "auto|float32|bfloat16|float16")
      ("quantization", po::value(&load.quantization)->default_value("auto"), "auto|none|fp8|int8")
      ("tp-size", po::value(&load.tp_size)->default_value(1), "tensor parallel ranks")
      ("load-format", po::value(&load.load_format)->default_value("auto"), "auto|safetensors|sharded|dummy")
      ("sharded-pattern", po::value(&load.sharded_pattern)->default_value(load.sharded_pattern),
       "file names of sharded state, with {rank} and {part}")
      ("no-fanout", po::bool_switch()->notifier([&load](bool off) { load.fanout = !off; }),
       "with --tp-size above 1: every rank reads the whole checkpoint itself, instead of a share of "
       "it that the ranks broadcast to each other");
}

bool parse(const std::string& command, const std::vector<std::string>& args, po::options_description& desc,
           CommonOptions& common) {
  desc.add_options()("help,h", "show this help");
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(desc).run(), vm);
    if (vm.count("help")) {
      std::cout << "usage: loadkit " << command << " [options]\n" << desc;
      return false;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    fail(ErrorKind::Usage, command, ": ", e.what());
  }
  log::set_level(log::parse_level(common.log_level));
  if (common.load.tp_size < 1) fail(ErrorKind::Usage, "--tp-size must be at least 1");
  return true;
}

void refuse_output_into(const std::string& command, const char* option, const std::string& output,
                        const std::string& input, const char* what) {
  if (output.empty() || input.empty() || !jobs::writes_into(output, input)) return;
  fail(ErrorKind::Usage, command, ": --", option, " ", output, " writes into ", input, ", ", what,
       ": a command never writes into a checkpoint it reads");
}

}  // namespace loadkit::cli
