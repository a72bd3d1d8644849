// Sharded state (each rank's kernel-format files) read through the staged path on CUDA: the same
// bytes in the model as the plain host path puts there, and, on the CPU, as the files hold.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <optional>

#include "device_skip.h"
#include "loadkit/causal_lm.h"
#include "loadkit/runtime/engine.h"
#include "model_checks.h"
#include "sharded_state.h"
#include "staging/staged_stream.h"

namespace loadkit::test {
namespace {

/// `f` saved as one rank's sharded state in parts of at most `part_bytes`, next to its config.
fs::path save_state(const Fixture& f, const fs::path& dir, uint64_t part_bytes) {
  auto model = load_model(f.dir);
  fs::create_directories(dir);
  save_sharded_state(model->model(), dir.string(), 0, kShardedStatePattern, part_bytes);
  copy_model_metadata(f.dir, dir.string());
  return dir;
}

/// Tensor bytes of the files a sharded load of `dir` reads (rank 0's parts).
uint64_t state_bytes(const fs::path& dir) {
  uint64_t total = 0;
  for (const auto& [name, t] : read_checkpoint(dir)) total += t.nbytes();
  return total;
}

TEST(ShardedStaged, CpuLoadHoldsTheFilesBytesAndReportsThemRead) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  const fs::path dir = save_state(f, tmp / "s", 40000);
  auto loaded = load_model(dir.string(), "cpu", "auto", "auto", "sharded");
  const auto state = kernel_state(*loaded);
  const auto files = read_checkpoint(dir);
  ASSERT_GT(files.size(), 3u);
  for (const auto& [name, t] : files) {
    SCOPED_TRACE(name);
    ASSERT_TRUE(state.count(name));
    EXPECT_TRUE(at::equal(state.at(name), t));
  }
  EXPECT_EQ(loaded->report().bytes_read, state_bytes(dir));
  EXPECT_EQ(loaded->report().bytes, state_bytes(dir));
}

class ScopedStaging {
 public:
  explicit ScopedStaging(bool on) {
    if (const char* old = std::getenv("LOADKIT_STAGING")) old_ = old;
    ::setenv("LOADKIT_STAGING", on ? "1" : "0", 1);
  }
  ~ScopedStaging() { old_ ? ::setenv("LOADKIT_STAGING", old_->c_str(), 1) : ::unsetenv("LOADKIT_STAGING"); }

 private:
  std::optional<std::string> old_;
};

TEST(ShardedStaged, CudaLoadIsByteIdenticalToThePlainPathAndStaged) {
  SKIP_WITHOUT(std::string("cuda"));
  for (const char* name : {"llama_fp32_gqa_sharded", "llama_bf16_gqa_tied"}) {
    SCOPED_TRACE(name);
    const Fixture& f = fixture(name);
    TempDir tmp;
    const fs::path dir = save_state(f, tmp / "s", 40000);
    std::map<std::string, at::Tensor> plain, staged;
    {
      ScopedStaging off(false);
      auto m = load_model(dir.string(), "cuda", "auto", "auto", "sharded");
      plain = kernel_state(*m);
    }
    const auto start = std::chrono::steady_clock::now();
    {
      ScopedStaging on(true);
      auto m = load_model(dir.string(), "cuda", "auto", "auto", "sharded");
      staged = kernel_state(*m);
      EXPECT_EQ(m->report().bytes_read, state_bytes(dir));
    }
    expect_identical(staged, plain);
    // The copy went through a staged stream of this load, every tensor of the files staged.
    const auto profile = last_staging_profile();
    ASSERT_TRUE(profile.has_value());
    EXPECT_GT(profile->opened_at, start);
    EXPECT_EQ(profile->tensors, read_checkpoint(dir).size());
    EXPECT_EQ(profile->bypassed_tensors, 0u);
  }
}

}  // namespace
}  // namespace loadkit::test
