#pragma once
/// \file
/// A job never destroys its own input: no output (`logits.out`,
/// `save_sharded.out`, `report.path`) may be, or lie inside, a checkpoint the
/// job reads — the model's directory, or a `reload.from` directory. A
/// save_sharded step writes part files and copies `config.json` into its
/// `out`, a logits or report file dropped into a checkpoint directory becomes
/// one more `*.safetensors` the next load reads: each would change the very
/// checkpoint the job (or the next one) loads. The CLI applies the same rule
/// to its own `--out` and `--report` (runtime/cli/options.h).
///
/// Paths are compared with symlinks resolved as far as they exist (an output
/// folder that will be created is compared by its text below the last
/// existing folder). One exception: a `reload.from` that an earlier
/// save_sharded step of the same job wrote is the job's own product, not an
/// input (save, then reload from what was saved).

#include <string>

#include "jobs/job.h"

namespace loadkit::jobs {

/// Whether writing `output` writes into `input`: the same path, or one inside
/// that directory, symlinks resolved on both sides.
bool writes_into(const std::string& output, const std::string& input);

/// Usage error `file:line:column: ...` at the first output that writes into a
/// checkpoint the job reads, naming both.
void check_outputs(const Job& job);

}  // namespace loadkit::jobs
