#pragma once
/// \file
/// The subcommands of `loadkit`. Each takes the arguments after its name and
/// returns the exit code; errors are thrown as loadkit::Error.

#include <string>
#include <vector>

namespace loadkit::cli {

int plugins_list(const std::vector<std::string>& args);
int inspect(const std::vector<std::string>& args);
int load(const std::vector<std::string>& args);
int logits(const std::vector<std::string>& args);
int reload(const std::vector<std::string>& args);
/// `run JOB.yaml`: the steps of a YAML job, in order (jobs/job.h has the schema).
int run(const std::vector<std::string>& args);
int save_sharded(const std::vector<std::string>& args);

}  // namespace loadkit::cli
