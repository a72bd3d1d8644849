// A job (and a command) never writes into a checkpoint it reads: outputs that
// are, or lie inside, the model directory or a reload source are refused when
// the job is parsed — exit 2, `file:line:column` of the output — before any
// step runs, symlinks resolved on both sides. The rule's one exception: a
// directory an earlier save_sharded step wrote may be reloaded from.

#include <gtest/gtest.h>

#include "jobs/job.h"
#include "loadkit/error.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr unsigned kDeadlineSeconds = 120;

/// The message of the Usage error parsing `text` as `<dir>/job.yaml` raises, or "" when it parses.
std::string refusal(const fs::path& dir, const std::string& text) {
  try {
    jobs::parse_job(text, (dir / "job.yaml").string());
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage) << e.what();
    return e.what();
  }
  return "";
}

class JobOutputs : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(tmp / "model");
    fs::create_directories(tmp / "next");
  }
  std::string model() const { return (tmp / "model").string(); }
  std::string next() const { return (tmp / "next").string(); }
  std::string job(const std::string& steps) const { return "model: {path: " + model() + "}\nsteps:\n  - load\n" + steps; }
  TempDir tmp;
};

TEST_F(JobOutputs, SaveShardedIntoTheModelDirectoryIsRefusedAtItsOut) {
  const std::string message = refusal(tmp.path(), job("  - save_sharded: {out: " + model() + "}\n"));
  EXPECT_EQ(message, (tmp / "job.yaml").string() + ":4:25: 'out' " + model() + " writes into " + model() +
                         ", the model directory: a job never writes into a checkpoint it reads");
}

TEST_F(JobOutputs, LogitsInsideTheModelDirectoryIsRefused) {
  const std::string message =
      refusal(tmp.path(), job("  - logits: {tokens: [1], out: " + model() + "/logits.safetensors}\n"));
  EXPECT_NE(message.find(":4:32: 'out' " + model() + "/logits.safetensors writes into " + model() + ", the model directory"),
            std::string::npos) << message;
}

TEST_F(JobOutputs, ReportInsideAReloadSourceIsRefusedNamingTheStepThatReadsIt) {
  const std::string message = refusal(tmp.path(), job("  - reload: {from: " + next() + "}\n  - report: {path: " + next() +
                                                      "/deep/report.json}\n"));
  EXPECT_NE(message.find(":5:20: 'path' " + next() + "/deep/report.json writes into " + next() +
                         ", the checkpoint step 2 'reload' reads (" + (tmp / "job.yaml").string() + ":4:5)"),
            std::string::npos) << message;
}

TEST_F(JobOutputs, AnOutputBeforeTheReloadThatReadsItIsRefusedToo) {
  // The save would overwrite the checkpoint before the reload reads it: still the job's input.
  fs::create_directories(tmp / "next" / "sub");
  EXPECT_NE(refusal(tmp.path(), job("  - save_sharded: {out: " + next() + "/sub}\n  - reload: {from: " + next() + "}\n")),
            "");
}

TEST_F(JobOutputs, SymlinksAreResolvedOnBothSides) {
  fs::create_directory_symlink(tmp / "model", tmp / "alias");
  // The output through a link into the model directory.
  EXPECT_NE(refusal(tmp.path(), job("  - logits: {tokens: [1], out: alias/x.safetensors}\n")).find("the model directory"),
            std::string::npos);
  // The model through the link, the output into its target.
  const std::string via_link = "model: {path: alias}\nsteps:\n  - load\n  - save_sharded: {out: model}\n";
  EXPECT_NE(refusal(tmp.path(), via_link).find("the model directory"), std::string::npos);
}

TEST_F(JobOutputs, NeighboursAndParentsAreNotInside) {
  // "model-out" shares a prefix with "model" but is not inside it; the parent is not inside either.
  EXPECT_EQ(refusal(tmp.path(), job("  - save_sharded: {out: " + model() + "-out}\n")), "");
  EXPECT_EQ(refusal(tmp.path(), job("  - report: {path: " + tmp.path().string() + "/report.json}\n")), "");
}

TEST_F(JobOutputs, ReloadingWhatAnEarlierSaveWroteIsAllowed) {
  EXPECT_EQ(refusal(tmp.path(), job("  - save_sharded: {out: saved}\n  - reload: {from: saved, "
                                    "process_weights_after_loading: false}\n")),
            "");
}

// Through the CLI: exit 2 before anything is loaded, nothing written into the checkpoint.
TEST(CommandOutputs, RunRefusesTheJobBeforeAnyStep) {
  TempDir tmp;
  const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
  write_bytes(tmp / "job.yaml", "model: {path: m}\nsteps:\n  - load\n  - logits: {tokens: [1, 2], out: m/l.safetensors}\n");
  auto r = run_cli({"run", (tmp / "job.yaml").string()}, {}, with_deadline(kDeadlineSeconds));
  expect_failure(r, 2, {(tmp / "job.yaml").string() + ":4:35", "writes into", "the model directory"});
  EXPECT_EQ(r.out.find("[1/2] load"), std::string::npos) << "a step ran: " << r.out;
  EXPECT_FALSE(fs::exists(m / "l.safetensors"));
}

TEST(CommandOutputs, SaveShardedInsideTheModelDirectoryIsExit2) {
  TempDir tmp;
  const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
  auto r = run_cli({"save-sharded", "--model", m.string(), "--out", (m / "sharded").string()}, {},
                   with_deadline(kDeadlineSeconds));
  expect_failure(r, 2, {"save-sharded: --out " + (m / "sharded").string() + " writes into " + m.string()});
  EXPECT_FALSE(fs::exists(m / "sharded"));
}

TEST(CommandOutputs, LogitsIntoTheModelDirectoryIsExit2) {
  TempDir tmp;
  const fs::path m = copy_fixture(fixture("llama_bf16_mqa"), tmp / "m");
  auto r = run_cli({"logits", "--model", m.string(), "--tokens", "1,2", "--out", (m / "logits.safetensors").string()}, {},
                   with_deadline(kDeadlineSeconds));
  expect_failure(r, 2, {"logits: --out", "the model directory"});
  EXPECT_FALSE(fs::exists(m / "logits.safetensors"));
}

TEST(CommandOutputs, ReloadOutputsIntoTheSourceAreExit2) {
  TempDir tmp;
  const fs::path from = copy_fixture(fixture("llama_fp32_gqa_b"), tmp / "from");
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  auto r = run_cli({"reload", "--model", f.dir, "--from", from.string(), "--tokens", f.tokens_arg(), "--out",
                    (from / "logits.safetensors").string()},
                   {}, with_deadline(kDeadlineSeconds));
  expect_failure(r, 2, {"reload: --out", "the checkpoint reloaded from"});
  auto report = run_cli({"reload", "--model", f.dir, "--from", from.string(), "--report", (from / "r.json").string()}, {},
                        with_deadline(kDeadlineSeconds));
  expect_failure(report, 2, {"reload: --report", "the checkpoint reloaded from"});
}

}  // namespace
}  // namespace loadkit::test
