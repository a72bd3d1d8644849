// Resource bounds: a header that claims more than a file holds, or
// a checkpoint larger than the memory it is going to, fails at once with one
// line, before anything of the claimed size is allocated.
//
// The claimed sizes are real file sizes where they must be (a sparse file:
// ftruncate gives it its length without using disk), and the CLI runs in a
// child whose peak resident memory (and, for the 100 GB header, address space)
// is what shows that nothing was allocated.

#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "device_skip.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr uint64_t kGiB = uint64_t{1} << 30;
/// The CLI (libtorch's CUDA build, all its libraries mapped) starts within
/// 4 GiB of address space here; 16 GiB leaves room for other builds and is
/// still far below the 100 GB the header claims.
constexpr uint64_t kAddressSpaceForTheCli = 16 * kGiB;

/// MemTotal + SwapTotal from /proc/meminfo: no more than this can ever be free here.
uint64_t machine_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  uint64_t total = 0;
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string key;
    uint64_t kb = 0;
    if (fields >> key >> kb && (key == "MemTotal:" || key == "SwapTotal:")) total += kb * 1024;
  }
  return total;
}

/// A checkpoint directory: the Llama fixture's config.json and one file whose
/// header claims `claimed` bytes of U8 tensor data. With `sparse`, the file
/// really is that long (holes); otherwise it stays a few hundred bytes.
fs::path claiming_checkpoint(const fs::path& dir, uint64_t claimed, bool sparse) {
  fs::create_directories(dir);
  fs::copy_file(fs::path(fixture("llama_fp32_gqa_sharded").dir) / "config.json", dir / "config.json");
  const nlohmann::json header = {{"model.embed_tokens.weight",
                                  {{"dtype", "U8"}, {"shape", {claimed}}, {"data_offsets", {0, claimed}}}}};
  const std::string bytes = safetensors_bytes(header.dump(), std::string(sparse ? 0 : 256, '\0'));
  const fs::path file = dir / "model.safetensors";
  write_bytes(file, bytes);
  if (sparse) {
    EXPECT_EQ(::truncate(file.c_str(), static_cast<off_t>(bytes.size() + claimed)), 0) << file;
  }
  return dir;
}

struct Timed {
  CliResult result;
  double seconds;
};
Timed timed_cli(const std::vector<std::string>& args, const ChildSetup& setup = {}) {
  const auto start = std::chrono::steady_clock::now();
  CliResult r = run_cli(args, {}, setup);
  return {std::move(r), std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
}

/// Exit 1, one line: `<dir>: out of memory: its weights need N MiB as <dtype> on <device> but only M MiB are free`.
void expect_out_of_memory(const Timed& t, const fs::path& dir, const std::string& device) {
  EXPECT_EQ(t.result.code, 1) << t.result.err;
  const auto lines = t.result.error_lines();
  ASSERT_EQ(lines.size(), 1u) << t.result.err;
  EXPECT_EQ(lines[0].rfind("loadkit: error: " + dir.string() + ": out of memory: its weights need ", 0), 0u) << lines[0];
  EXPECT_NE(lines[0].find(" on " + device), std::string::npos) << lines[0];
  EXPECT_NE(lines[0].find(" MiB are free"), std::string::npos) << lines[0];
  // Checked before the model is built: the process never held more than the runtime itself.
  EXPECT_LT(t.result.peak_rss_bytes, 2 * kGiB);
  EXPECT_LT(t.seconds, 30.0) << "a pre-check, not an attempt";  // a generous bound, not a speed assertion
}

TEST(ResourceBounds, CheckpointLargerThanFreeHostMemoryFailsBeforeBuilding) {
  TempDir tmp;
  const fs::path dir = claiming_checkpoint(tmp / "huge", 2 * machine_memory_bytes(), /*sparse=*/true);
  const Timed t = timed_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()});
  expect_out_of_memory(t, dir, "cpu");
}

TEST(ResourceBounds, CheckpointLargerThanFreeDeviceMemoryFailsBeforeBuilding) {
  SKIP_WITHOUT(std::string("cuda"));
  TempDir tmp;
  // More than twice the host's memory and at least 1 TiB: more than any single GPU holds.
  const fs::path dir =
      claiming_checkpoint(tmp / "huge", std::max<uint64_t>(2 * machine_memory_bytes(), 1024 * kGiB), /*sparse=*/true);
  const Timed t = timed_cli({"load", "--model", dir.string(), "--device", "cuda", "--plugin-dir", plugin_dir()});
  expect_out_of_memory(t, dir, "cuda:0");
}

// The header claims 100 GB in a file of a few hundred bytes. The CLI runs with
// an address space far below 100 GB: had it tried to allocate (or map) what
// the header claims, it would fail with an allocation error (exit 1), not with
// the header's one line (exit 3).
TEST(ResourceBounds, HundredGigabyteTensorInATinyFileFailsFastWithoutAllocating) {
  TempDir tmp;
  const uint64_t claimed = 100'000'000'000;
  const fs::path dir = claiming_checkpoint(tmp / "liar", claimed, /*sparse=*/false);
  const fs::path file = dir / "model.safetensors";
  ASSERT_LT(fs::file_size(file), 1024u);
  const Timed t = timed_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()},
                            limit_address_space(kAddressSpaceForTheCli));
  ASSERT_NE(t.result.code, kChildSetupFailed) << t.result.err;
  EXPECT_EQ(t.result.code, 3) << t.result.err;
  const auto lines = t.result.error_lines();
  ASSERT_EQ(lines.size(), 1u) << t.result.err;
  EXPECT_NE(lines[0].find(file.string() + ": tensor 'model.embed_tokens.weight': data ends at byte 100000000000 "
                                          "but the data section holds only 256 bytes"),
            std::string::npos)
      << lines[0];
  EXPECT_LT(t.result.peak_rss_bytes, 2 * kGiB);
  EXPECT_LT(t.seconds, 30.0);
}

}  // namespace
}  // namespace loadkit::test
