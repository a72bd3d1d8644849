// Limits the process runs under, set in the CLI's child before exec: a
// file-size limit (RLIMIT_FSIZE: SIGXFSZ would end the CLI without a word and
// leave a *.tmp), an address-space limit smaller than a checkpoint (it is
// never mapped: its headers are read; a load needs its tensors: exit 1), and a
// tensor-parallel size this machine cannot run (refused before any rank
// starts), and standard output into a pipe its reader has closed (SIGPIPE would end the CLI
// without a word). Every run has a deadline; a signal fails the test.

#include <gtest/gtest.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>

#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr unsigned kDeadlineSeconds = 120;

ChildSetup limit_file_size(uint64_t bytes) {
  return with_deadline(kDeadlineSeconds, [bytes] {
    const struct rlimit limit {bytes, bytes};
    if (setrlimit(RLIMIT_FSIZE, &limit) != 0) {
      dprintf(2, "cannot limit the file size: setrlimit(RLIMIT_FSIZE): %s\n", std::strerror(errno));
      _exit(kChildSetupFailed);
    }
  });
}

/// Every file under `dir` (a *.tmp left behind included).
std::vector<std::string> files_under(const fs::path& dir) {
  std::vector<std::string> out;
  if (!fs::exists(dir)) return out;
  for (const auto& e : fs::recursive_directory_iterator(dir)) out.push_back(e.path().filename().string());
  return out;
}

constexpr uint64_t kFileSizeLimit = 16 * 1024;  // below every output below, above anything the CLI prints

TEST(FileSizeLimit, LogitsPastItFailWithOneLineNamingTheFileAndLeaveNoTemporary) {
  TempDir tmp;
  const Fixture& f = fixture("llama_fp32_gqa_sharded");  // 11 tokens × 1000 × 4 bytes = 44 KB of logits
  fs::create_directories(tmp / "out");
  const fs::path out = tmp / "out" / "logits.safetensors";
  auto r = run_cli({"logits", "--model", f.dir, "--tokens", f.tokens_arg(), "--out", out.string()}, {},
                   limit_file_size(kFileSizeLimit));
  ASSERT_NE(r.code, 128 + SIGXFSZ) << "killed by SIGXFSZ";
  expect_failure(r, 1, {out.string(), "File too large"});
  EXPECT_EQ(files_under(tmp / "out"), std::vector<std::string>{}) << "a partial or temporary file was left";
}

TEST(FileSizeLimit, SaveShardedPastItFailsWithOneLineNamingThePartAndLeavesNoTemporary) {
  TempDir tmp;
  auto r = run_cli({"save-sharded", "--model", fixture("llama_fp32_gqa_sharded").dir, "--out", (tmp / "sharded").string()},
                   {}, limit_file_size(kFileSizeLimit));
  ASSERT_NE(r.code, 128 + SIGXFSZ) << "killed by SIGXFSZ";
  expect_failure(r, 1, {(tmp / "sharded" / "model-rank-0-part-0.safetensors").string(), "File too large"});
  for (const auto& name : files_under(tmp / "sharded"))
    EXPECT_FALSE(name.ends_with(".tmp")) << name << " was left behind";
}

// A reader that stops early (`loadkit inspect … | head -1`): the CLI is not ended by SIGPIPE. Its
// write fails, and a command that would have succeeded says so in one line, exit 1: exit 0 would
// claim output that was never written.
ChildSetup stdout_into_a_pipe_nobody_reads() {
  return with_deadline(kDeadlineSeconds, [] {
    int fds[2];
    if (pipe(fds) != 0 || dup2(fds[1], 1) < 0) {
      dprintf(2, "cannot make the pipe: %s\n", std::strerror(errno));
      _exit(kChildSetupFailed);
    }
    close(fds[0]);
    close(fds[1]);
  });
}

TEST(ClosedStdout, AReaderThatStoppedIsExit1NamingStandardOutputNotSigpipe) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  for (const std::vector<std::string>& args :
       {std::vector<std::string>{"inspect", "--model", f.dir}, {"plugins", "list", "--plugin-dir", plugin_dir()},
        {"load", "--model", f.dir, "--plugin-dir", plugin_dir()}}) {
    SCOPED_TRACE(args[0]);
    const auto r = run_cli(args, {}, stdout_into_a_pipe_nobody_reads());
    ASSERT_NE(r.code, 128 + SIGPIPE) << "killed by SIGPIPE";
    expect_failure(r, 1, {"standard output", "write failed"});
  }
}

// Checkpoints are read with pread, never mapped (runtime/src/formats/safetensors_file.h): a file
// larger than the address space left costs none of it until its tensors are read. A sparse file:
// 20 GiB of size, no disk used, under a 16 GiB limit. Reading its headers succeeds; a load, whose
// model must hold the 20 GiB, fails with exit 1 (memory, the file being fine) and one line.
TEST(AddressSpaceLimit, ACheckpointLargerThanTheAddressSpaceIsNeverMapped) {
  TempDir tmp;
  const fs::path m = tmp / "big";
  fs::create_directories(m);
  fs::copy_file(fixture("llama_bf16_mqa").dir + "/config.json", m / "config.json");
  constexpr uint64_t kBytes = 20ull << 30;
  const std::string header = R"({"model.embed_tokens.weight":{"dtype":"U8","shape":[)" + std::to_string(kBytes) +
                             R"(],"data_offsets":[0,)" + std::to_string(kBytes) + "]}}";
  const std::string head = safetensors_bytes(header, "");
  write_bytes(m / "model.safetensors", head);
  fs::resize_file(m / "model.safetensors", head.size() + kBytes);
  constexpr uint64_t kLimit = 16ull << 30;  // the CLI itself needs < 4 GiB (test_resource_bounds.cpp)
  auto inspected = run_cli({"inspect", "--model", m.string()}, {}, with_deadline(kDeadlineSeconds, limit_address_space(kLimit)));
  EXPECT_EQ(inspected.code, 0) << inspected.err;
  EXPECT_NE(inspected.out.find("model.embed_tokens.weight"), std::string::npos) << inspected.out;
  auto r = run_cli({"load", "--model", m.string(), "--plugin-dir", plugin_dir()}, {},
                   with_deadline(kDeadlineSeconds, limit_address_space(kLimit)));
  expect_failure(r, 1, {});
}

int usable_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  EXPECT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  return CPU_COUNT(&set);
}

// 24 CPU ranks on a small machine took 4.4 GB and 17 s to fail: now refused before any starts.
TEST(TensorParallelSize, MoreCpuRanksThanTheMachineRunsIsExit2AtOnce) {
  const int limit = std::max(usable_cpus(), 8);  // ranks.cpp's bound, stated independently
  for (int tp : {limit + 1, 1000}) {
    const auto start = std::chrono::steady_clock::now();
    auto r = run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--tp-size", std::to_string(tp)}, {},
                     with_deadline(kDeadlineSeconds));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    expect_failure(r, 2, {"--tp-size " + std::to_string(tp), "at most " + std::to_string(limit) + " CPU ranks"});
    EXPECT_LT(seconds, 20.0) << "ranks were started before the size was checked";
    EXPECT_LT(r.peak_rss_bytes, 1ull << 30);
  }
}

TEST(TensorParallelSize, MoreCudaRanksThanVisibleGpusIsExit2AtOnce) {
  // One GPU per rank: one more rank than there are GPUs (2 ranks on a machine without one).
  int gpus = 0;
  for (int i = 0; i < 64; ++i)
    if (fs::exists("/dev/nvidia" + std::to_string(i))) gpus = i + 1;
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES"))
    GTEST_SKIP() << "CUDA_VISIBLE_DEVICES=" << visible << " hides GPUs from this count";
  const std::string tp = std::to_string(std::max(gpus + 1, 2));
  auto r = run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--device", "cuda", "--tp-size", tp}, {},
                   with_deadline(kDeadlineSeconds));
  expect_failure(r, 2, {"--tp-size " + tp});
  EXPECT_TRUE(r.err.find("each rank needs its own GPU but " + std::to_string(gpus) + " CUDA device(s) are visible") !=
                  std::string::npos ||
              r.err.find("no NCCL") != std::string::npos)
      << r.err;
}

}  // namespace
}  // namespace loadkit::test
