// Reading a checkpoint once for a tensor-parallel group (runtime/src/fanout/): the plan's shares,
// and loads, reloads and read failures over a real process group. The ranks of a group are
// threads of this process here (Gloo on the CPU; NCCL, one GPU each, where two GPUs exist), so
// each rank's model can be compared with a model that read the whole checkpoint itself.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>

#include "device_skip.h"
#include "fanout/fanout_plan.h"
#include "loadkit/error.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "model_checks.h"
#include "tensor_io.h"

namespace loadkit::test {
namespace {

using json = nlohmann::ordered_json;

// ------------------------------------------------------------ the plan

/// Tensor sizes as checkpoints have them: many small ones, some large, a few empty.
std::vector<fanout::Item> random_items(int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<fanout::Item> items;
  for (int i = 0; i < n; ++i) {
    const uint64_t kind = rng() % 10;
    const uint64_t bytes = kind == 0 ? 0 : kind < 7 ? 2 * (1 + rng() % 512) : 4 * (1000 + rng() % 100000);
    items.push_back({"t." + std::to_string(rng() % 100000) + "." + std::to_string(i), bytes});
  }
  return items;
}

TEST(FanoutPlan, EveryTensorOnceInDisjointAlignedPlacesWithBalancedShares) {
  for (int ranks : {1, 2, 3, 4})
    for (uint64_t bound : {uint64_t{1} << 12, uint64_t{1} << 18, uint64_t{1} << 40}) {
      SCOPED_TRACE(std::to_string(ranks) + " ranks, rounds of " + std::to_string(bound));
      const auto items = random_items(300, static_cast<unsigned>(ranks * 7 + bound % 97));
      const fanout::Plan plan = fanout::make_plan(items, ranks, bound);
      std::vector<int> seen(items.size(), 0);
      std::vector<uint64_t> read(ranks, 0);
      size_t next_item = 0;
      for (const auto& round : plan.rounds) {
        ASSERT_FALSE(round.placements.empty());
        uint64_t data = 0;
        // Segments: in rank order, back to back, each holding its status word first.
        uint64_t at = 0;
        for (int r = 0; r < ranks; ++r) {
          EXPECT_EQ(round.segment_begin[r], at);
          if (round.segment_bytes[r]) {
            EXPECT_GE(round.segment_bytes[r], fanout::kStatusBytes);
          }
          at += round.segment_bytes[r];
        }
        EXPECT_EQ(at, round.bytes);
        std::vector<std::pair<uint64_t, uint64_t>> spans;  // [begin, end) of every tensor
        for (const auto& p : round.placements) {
          ASSERT_EQ(p.item, next_item++) << "placements follow the delivery order";
          ++seen[p.item];
          const uint64_t bytes = items[p.item].bytes;
          data += bytes;
          read[p.owner] += bytes;
          EXPECT_EQ(p.offset % fanout::kAlign, 0u);
          EXPECT_GE(p.offset, round.segment_begin[p.owner] + fanout::kStatusBytes);
          EXPECT_LE(p.offset + bytes, round.segment_begin[p.owner] + round.segment_bytes[p.owner]);
          if (bytes) spans.emplace_back(p.offset, p.offset + bytes);
        }
        std::sort(spans.begin(), spans.end());
        for (size_t i = 1; i < spans.size(); ++i) EXPECT_LE(spans[i - 1].second, spans[i].first);
        if (round.placements.size() > 1) {
          EXPECT_LE(data, bound);
        }
      }
      EXPECT_EQ(next_item, items.size());
      for (int count : seen) EXPECT_EQ(count, 1);
      EXPECT_EQ(read, plan.read_bytes);
      uint64_t largest = 0;
      for (const auto& item : items) largest = std::max(largest, item.bytes);
      const auto [lo, hi] = std::minmax_element(read.begin(), read.end());
      EXPECT_LE(*hi - *lo, largest) << "shares within the largest tensor of each other";
    }
}

TEST(FanoutPlan, FingerprintDiffersWhenANameOrASizeDoes) {
  auto items = random_items(50, 3);
  const std::string base = fanout::fingerprint(items, 2);
  EXPECT_EQ(fanout::fingerprint(items, 2), base);
  EXPECT_NE(fanout::fingerprint(items, 3), base);
  auto other = items;
  other[17].bytes += 2;
  EXPECT_NE(fanout::fingerprint(other, 2), base);
  other = items;
  other[3].name += "x";
  EXPECT_NE(fanout::fingerprint(other, 2), base);
  other = items;
  std::swap(other[5], other[6]);
  EXPECT_NE(fanout::fingerprint(other, 2), base) << "the delivery order counts";
}

// ------------------------------------------------------------ ranks as threads

/// Sets an environment variable for one test, restoring it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const std::string& value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    ::setenv(name, value.c_str(), 1);
  }
  ~ScopedEnv() { old_ ? ::setenv(name_, old_->c_str(), 1) : ::unsetenv(name_); }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

/// What one rank did: its error ("" after success), its report, its model's kernel state.
struct RankResult {
  std::string error;
  ErrorKind kind = ErrorKind::Other;
  LoadReport report;
  std::map<std::string, at::Tensor> before, after;  // around a reload ("before" empty without one)
};

/// Loads `model` on `n` ranks (threads joined to one group on `device`: "cpu", or "cuda" for one GPU
/// each), reading it once for the group, and reloads `reload_from` when given.
/// `rank1_model`, when given, is what rank 1 loads instead.
std::vector<RankResult> run_ranks(int n, const std::string& device, const std::string& model,
                                  const std::string& reload_from = "", Rollback rollback = Rollback::None,
                                  const std::string& rank1_model = "") {
  ScopedEnv timeout("LOADKIT_TP_TIMEOUT", "60");  // a bug here fails the test, not the suite's clock
  Registry& registry = build_registry();
  const int port = free_port();
  std::vector<RankResult> out(n);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < n; ++rank)
    threads.emplace_back([&, rank] {
      RankResult& result = out[rank];
      try {
        const std::string dev = device == "cpu" ? device : "cuda:" + std::to_string(rank);
        auto group = join_local_rank(rank, n, port, dev);
        LoadOptions o;
        o.model_dir = rank == 1 && !rank1_model.empty() ? rank1_model : model;
        o.device = dev;
        o.tp_size = n;
        o.tp_rank = rank;
        o.tp_group = group->tp_group();
        o.rank_group = group->world();
        auto loaded = LoadedModel::load(o, registry);
        result.report = loaded->report();
        if (!reload_from.empty()) {
          result.before = kernel_state(*loaded);
          try {
            result.report = loaded->reload(reload_from, true, rollback);
          } catch (...) {
            result.after = kernel_state(*loaded);
            throw;
          }
        }
        result.after = kernel_state(*loaded);
      } catch (const Error& e) {
        result.error = e.what();
        result.kind = e.kind();
      } catch (const std::exception& e) {
        result.error = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return out;
}

/// Rank `rank`'s kernel state as a load that reads the whole checkpoint itself gives it.
std::map<std::string, at::Tensor> read_alone(const std::string& dir, int n, int rank, const std::string& device = "cpu") {
  auto m = load_model(dir, device == "cpu" ? device : "cuda:" + std::to_string(rank), "auto", "auto", "auto", n, rank);
  return kernel_state(*m);
}

uint64_t largest_tensor(const std::string& dir) {
  uint64_t largest = 0;
  for (const auto& [name, t] : read_checkpoint(dir)) largest = std::max<uint64_t>(largest, t.nbytes());
  return largest;
}

uint64_t checkpoint_bytes(const std::string& dir) {
  uint64_t total = 0;
  for (const auto& [name, t] : read_checkpoint(dir)) total += t.nbytes();
  return total;
}

/// Every rank read a share of about 1/n (within the largest tensor), the shares add up to the
/// checkpoint, and every rank's model still took in all of it.
void expect_shares(const std::vector<RankResult>& ranks, const std::string& dir) {
  const uint64_t total = checkpoint_bytes(dir), largest = largest_tensor(dir);
  const uint64_t n = ranks.size();
  uint64_t sum = 0;
  for (size_t r = 0; r < n; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(ranks[r].report.bytes, total);
    EXPECT_LE(ranks[r].report.bytes_read, total / n + largest);
    EXPECT_GE(ranks[r].report.bytes_read + largest, total / n);
    sum += ranks[r].report.bytes_read;
  }
  EXPECT_EQ(sum, total);
}

struct FanoutCase {
  const char* fixture;
  int tp;
  int round_kb;  ///< 0: the default round (the whole fixture in one)
};

void PrintTo(const FanoutCase& c, std::ostream* os) { *os << c.fixture << " at TP " << c.tp << ", rounds " << c.round_kb << " KB"; }

class FanoutLoad : public ::testing::TestWithParam<FanoutCase> {};

TEST_P(FanoutLoad, EveryRankHoldsWhatReadingItAllGivesIt) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const auto [name, tp, round_kb] = GetParam();
  const Fixture& f = fixture(name);
  std::optional<ScopedEnv> rounds;
  if (round_kb) rounds.emplace("LOADKIT_FANOUT_ROUND_KB", std::to_string(round_kb));
  const auto ranks = run_ranks(tp, "cpu", f.dir);
  for (int r = 0; r < tp; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_EQ(ranks[r].error, "");
    expect_identical(ranks[r].after, read_alone(f.dir, tp, r));
  }
  expect_shares(ranks, f.dir);
}

INSTANTIATE_TEST_SUITE_P(Cpu, FanoutLoad,
                         ::testing::Values(FanoutCase{"llama_fp32_gqa_sharded", 2, 0},
                                           FanoutCase{"llama_fp32_gqa_sharded", 2, 16},  // many rounds, over many files
                                           FanoutCase{"llama_fp32_tp_mqa", 3, 0},
                                           FanoutCase{"llama_fp32_tp_mqa", 3, 8},
                                           FanoutCase{"deepseek_v2_fp32_tp3", 3, 32},  // experts: many tensors
                                           FanoutCase{"llama_bf16_gqa_tied", 2, 4}),
                         [](const auto& info) {
                           return std::string(info.param.fixture) + "_tp" + std::to_string(info.param.tp) + "_" +
                                  (info.param.round_kb ? std::to_string(info.param.round_kb) + "kb" : "one_round");
                         });

TEST(Fanout, ReloadUnderTpIsBitIdenticalToAFreshLoadOnEveryRank) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  const Fixture& b = fixture(a.reload_target);
  ScopedEnv rounds("LOADKIT_FANOUT_ROUND_KB", "16");
  const auto ranks = run_ranks(2, "cpu", a.dir, b.dir);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_EQ(ranks[r].error, "");
    EXPECT_TRUE(ranks[r].report.pointers_stable);
    EXPECT_FALSE(identical(ranks[r].before, ranks[r].after)) << "the reload changed nothing";
    expect_identical(ranks[r].after, read_alone(b.dir, 2, r));
  }
  expect_shares(ranks, b.dir);
}

/// The largest file of a checkpoint directory.
fs::path largest_file(const fs::path& dir) {
  fs::path best;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors" && (best.empty() || fs::file_size(e.path()) > fs::file_size(best)))
      best = e.path();
  return best;
}

/// A copy of `f` under `tmp` (the change hook rewrites it), and the file of it to change: its largest.
std::pair<fs::path, fs::path> copy_to_change(const Fixture& f, const TempDir& tmp) {
  const fs::path copy = copy_fixture(f, tmp / "copy");
  return {copy, largest_file(copy)};
}

// A file rewritten in place after its first tensor is read: the rank reading the next tensor of
// it fails, every rank stops with an Input error naming the file, and with a journal every
// rank's model is as it was before the reload, bit for bit.
TEST(Fanout, AReadThatFailsOnOneRankStopsEveryRankAndLeavesTheModelsAsTheyWere) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  const auto [b, changed] = copy_to_change(fixture(a.reload_target), tmp);
  ScopedEnv hook("LOADKIT_TEST_CHANGE_FILE", "rewrite:1:" + changed.string());
  const auto ranks = run_ranks(2, "cpu", a.dir, b.string(), Rollback::Journal);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(ranks[r].kind, ErrorKind::Input) << ranks[r].error;
    EXPECT_NE(ranks[r].error.find(changed.string()), std::string::npos) << ranks[r].error;
    EXPECT_NE(ranks[r].error.find("changed while it was read"), std::string::npos) << ranks[r].error;
    EXPECT_EQ(ranks[r].error.find('\n'), std::string::npos) << "one line";
    EXPECT_NE(ranks[r].error.find("tensor '"), std::string::npos) << "the owner names it, the others pass it on";
    ASSERT_FALSE(ranks[r].before.empty());
    expect_identical(ranks[r].after, ranks[r].before);
  }
}

// Rank 1 is given another checkpoint of the same shapes (its tensors in other files, another
// order): no rank may take the other's bytes for its own, so both stop before any transfer.
TEST(Fanout, RanksThatSeeDifferentCheckpointsStopBeforeAnyTransfer) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  const Fixture& b = fixture(a.reload_target);
  const auto ranks = run_ranks(2, "cpu", a.dir, "", Rollback::None, b.dir);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(ranks[r].kind, ErrorKind::Other) << ranks[r].error;
    EXPECT_NE(ranks[r].error.find("see different checkpoints"), std::string::npos) << ranks[r].error;
  }
}

// ------------------------------------------------------------ NCCL

TEST(FanoutGpu, NcclLoadAndReloadMatchReadingItAllOnEveryRank) {
  SKIP_WITHOUT_TP_BACKEND("cuda");
  if (!at::hasCUDA() || at::getNumGPUs() < 2)
    GTEST_SKIP() << "needs 2 CUDA devices (one a rank); runs on a 2-GPU machine (device tool)";
  ScopedEnv nvls("NCCL_NVLS_ENABLE", "0");
  ScopedEnv opt_in("LOADKIT_FANOUT", "1");  // opt-in on CUDA until it has run on several GPUs (engine.cpp)
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  const Fixture& b = fixture(a.reload_target);
  ScopedEnv rounds("LOADKIT_FANOUT_ROUND_KB", "16");
  const auto loads = run_ranks(2, "cuda", a.dir);
  const auto reloads = run_ranks(2, "cuda", a.dir, b.dir);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_EQ(loads[r].error, "");
    ASSERT_EQ(reloads[r].error, "");
    expect_identical(loads[r].after, read_alone(a.dir, 2, r, "cuda"));
    expect_identical(reloads[r].after, read_alone(b.dir, 2, r, "cuda"));
  }
  expect_shares(loads, a.dir);
  expect_shares(reloads, b.dir);
}

// ------------------------------------------------------------ through the CLI

std::vector<std::string> with_plugins(std::vector<std::string> args) {
  args.insert(args.end(), {"--plugin-dir", plugin_dir(), "--log-level", "warn"});
  return args;
}

json load_report(const Fixture& f, int tp, std::vector<std::string> extra, const fs::path& path) {
  std::vector<std::string> args{"load", "--model", f.dir, "--tp-size", std::to_string(tp), "--report", path.string()};
  args.insert(args.end(), extra.begin(), extra.end());
  const CliResult r = run_cli(with_plugins(args));
  EXPECT_EQ(r.code, 0) << r.err;
  return r.code == 0 ? json::parse(read_bytes(path)) : json();
}

TEST(FanoutCli, ReportGivesEveryRanksBytesReadAndNoFanoutReadsItAllOnEachRank) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_fp32_tp_mqa");
  TempDir tmp;
  const uint64_t total = checkpoint_bytes(f.dir), largest = largest_tensor(f.dir);
  const json once = load_report(f, 3, {}, tmp / "once.json");
  const json every = load_report(f, 3, {"--no-fanout"}, tmp / "every.json");
  ASSERT_EQ(once["ranks"].size(), 3u);
  ASSERT_EQ(every["ranks"].size(), 3u);
  uint64_t sum = 0;
  for (int r = 0; r < 3; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const uint64_t read = once["ranks"][r]["bytes_read"].get<uint64_t>();
    EXPECT_LE(read, total / 3 + largest);
    EXPECT_GE(read + largest, total / 3);
    sum += read;
    EXPECT_EQ(once["ranks"][r]["bytes"].get<uint64_t>(), total);
    EXPECT_EQ(every["ranks"][r]["bytes_read"].get<uint64_t>(), total);
  }
  EXPECT_EQ(sum, total);
  EXPECT_EQ(once["bytes_read"].get<uint64_t>(), once["ranks"][0]["bytes_read"].get<uint64_t>());
}

TEST(FanoutCli, LogitsWithAndWithoutFanoutAreEqual) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("qwen2_fp32_tp3");
  TempDir tmp;
  auto logits = [&](const std::string& out, std::vector<std::string> extra) {
    std::vector<std::string> args{"logits", "--model", f.dir, "--tokens", f.tokens_arg(), "--tp-size", "3", "--out",
                                  (tmp / out).string()};
    args.insert(args.end(), extra.begin(), extra.end());
    const CliResult r = run_cli(with_plugins(args), {{"LOADKIT_FANOUT_ROUND_KB", "8"}});
    EXPECT_EQ(r.code, 0) << r.err;
    for (auto& [name, t] : load_tensors((tmp / out).string()))
      if (name == "logits") return t;
    return at::Tensor();
  };
  const at::Tensor once = logits("once.safetensors", {});
  const at::Tensor every = logits("every.safetensors", {"--no-fanout"});
  ASSERT_TRUE(once.defined() && every.defined());
  EXPECT_TRUE(at::equal(once, every));
  expect_close(once, reference_logits(f), f.dtype);
}

TEST(FanoutCli, AFileChangedMidFanoutIsExitThreeNamingFileAndTensor) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& a = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  const auto [b, changed] = copy_to_change(fixture(a.reload_target), tmp);
  const CliResult r =
      run_cli(with_plugins({"reload", "--model", a.dir, "--from", b.string(), "--tp-size", "2", "--journal", "--tokens",
                            "1,2", "--out", (tmp / "o").string()}),
              {{"LOADKIT_TEST_CHANGE_FILE", "rewrite:1:" + changed.string()}, {"LOADKIT_TP_TIMEOUT", "60"}},
              with_deadline(120));
  expect_failure(r, 3, {changed.string(), "changed while it was read", "tensor '"});
  EXPECT_FALSE(fs::exists(tmp / "o"));
}

}  // namespace
}  // namespace loadkit::test
