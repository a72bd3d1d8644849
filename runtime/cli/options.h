#pragma once
/// \file
/// Command-line parsing shared by the subcommands (Boost.Program_options).

#include <boost/program_options.hpp>
#include <string>
#include <vector>

#include "loadkit/runtime/engine.h"

namespace loadkit::cli {

namespace po = boost::program_options;

/// The options every model command takes (the usage text's "common").
struct CommonOptions {
  std::vector<std::string> plugin_dirs;
  LoadOptions load;
  std::string log_level = "info";
};

/// Adds --plugin-dir --device --dtype --quantization --tp-size --load-format --log-level.
void add_common(po::options_description& desc, CommonOptions& common);
/// Adds --plugin-dir and --log-level only.
void add_plugin_dirs(po::options_description& desc, CommonOptions& common);

/// Parses `args` against `desc`; unknown options, missing required ones and
/// bad values are Usage errors. Applies --log-level. Returns false after
/// printing help when --help was given.
bool parse(const std::string& command, const std::vector<std::string>& args, po::options_description& desc,
           CommonOptions& common);

/// A command never writes into a checkpoint it reads (jobs/output_guard.h has
/// the rule and why): Usage error `<command>: --<option> <output> writes into
/// <input>, <what>: ...` when `output` is `input` or lies inside it. Empty paths pass.
void refuse_output_into(const std::string& command, const char* option, const std::string& output,
                        const std::string& input, const char* what);

}  // namespace loadkit::cli
