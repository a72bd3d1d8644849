#pragma once
/// \file
/// How a model command runs under tensor parallelism: on one rank, as N local
/// ranks (`--tp-size N`), or as one rank of a torchrun-style job (RANK,
/// WORLD_SIZE, … in the environment). Rank 0 writes the outputs.

#include <functional>
#include <string>
#include <vector>

#include "options.h"

namespace loadkit {
class RankGroup;
struct LoadReport;
}  // namespace loadkit

namespace loadkit::cli {

class Ranks {
 public:
  explicit Ranks(RankGroup* group = nullptr) : group_(group) {}
  int rank() const;
  int size() const;
  /// Rank 0 (or the only rank) prints, writes logits and reports.
  bool writes_outputs() const { return rank() == 0; }
  /// Runs `fn` on this rank as a step that every rank finishes before any goes
  /// on; a failure on one rank stops all of them with its message. Returns the
  /// payloads of all ranks in rank order.
  std::vector<std::string> step(const std::string& name, const std::function<std::string()>& fn);

 private:
  RankGroup* group_;
};

/// Runs `body` on this process's rank; with `--tp-size N` > 1 and no rank
/// environment, starts N ranks of this command instead (and returns 0 or
/// throws the failing rank's error).
int run_on_ranks(CommonOptions& common, const std::function<int(Ranks&)>& body);

/// A step payload with a rank's load or reload timing.
std::string timing_payload(const LoadReport& report);
/// The report as JSON; with several ranks, plus "tp_size" and "ranks": each
/// rank's bytes, bytes_read, seconds and gb_per_s (from the timing payloads).
std::string report_json(const LoadReport& report, const std::vector<std::string>& timings);

}  // namespace loadkit::cli
