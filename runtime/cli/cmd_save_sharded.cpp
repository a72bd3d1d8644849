// loadkit save-sharded: each rank's kernel-format state as vLLM's sharded_state files.

#include <iostream>

#include "commands.h"
#include "loadkit/error.h"
#include "loadkit/causal_lm.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
#include "ranks.h"
#include "sharded_state.h"

namespace loadkit::cli {

int save_sharded(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string out;
  int64_t max_part_size = 0;
  po::options_description desc("save-sharded");
  add_common(desc, common);
  desc.add_options()
      ("model", po::value(&common.load.model_dir)->required(), "checkpoint directory to load")
      ("out", po::value(&out)->required(), "directory for the sharded state (created)")
      ("max-part-size", po::value(&max_part_size), "largest part file in bytes (default: one part per rank)");
  if (!parse("save-sharded", args, desc, common)) return 0;
  if (max_part_size < 0) fail(ErrorKind::Usage, "--max-part-size must be positive");
  refuse_output_into("save-sharded", "out", out, common.load.model_dir, "the model directory");
  std::optional<uint64_t> limit;
  if (max_part_size > 0) limit = static_cast<uint64_t>(max_part_size);

  return run_on_ranks(common, [&](Ranks& ranks) {
    Registry registry(Registry::search_path(common.plugin_dirs));
    std::unique_ptr<LoadedModel> model;
    ranks.step("load", [&] {
      model = LoadedModel::load(common.load, registry);
      return std::string();
    });
    const auto files = ranks.step("save", [&] {
      const auto written =
          save_sharded_state(model->model(), out, ranks.rank(), common.load.sharded_pattern, limit);
      if (ranks.rank() == 0) copy_model_metadata(common.load.model_dir, out);
      return std::to_string(written.size());
    });
    if (!ranks.writes_outputs()) return 0;
    size_t total = 0;
    for (const auto& n : files) total += std::stoul(n);
    std::cout << "wrote " << total << " sharded-state files for " << files.size() << " rank(s) to " << out << "\n";
    return 0;
  });
}

}  // namespace loadkit::cli
