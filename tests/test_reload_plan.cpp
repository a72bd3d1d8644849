// Reloads by plan (runtime/src/reload/reload_plan.h): a checkpoint laid out as the last recorded
// reload's (a trainer's next step, written the same way) replays that reload's writes without the
// validation pass or the loaders. Every result is compared with an independent reference: fresh
// loads of the same checkpoints, and a model that never recorded a plan given the same bad
// checkpoint, whose error the model with a plan must repeat word for word, its weights untouched.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "device_skip.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"

namespace loadkit::test {
namespace {

struct Case {
  const char* fixture;
  const char* quant;
  const char* device;
  /// Every module plain, every loader describing its writes: reloads go by plan. Otherwise modules
  /// are rebuilt, and reloads keep the stream order of the one before.
  bool replays;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.fixture << " " << c.quant << " " << c.device; }  // not bytes

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return std::string(info.param.fixture) + "_" + info.param.quant + "_" + info.param.device;
}

/// The fixture `a` loaded, and two next steps of it written the same way (one file, same names,
/// dtypes and shapes, other values): the first reload of either records the plan the others take.
class ReloadPlan : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT(device);
    next1 = write_next_step(a, tmp / "next1", 7);
    next2 = write_next_step(a, tmp / "next2", 8);
  }
  std::unique_ptr<LoadedModel> load(const fs::path& dir) const { return load_model(dir.string(), device, quant); }

  const Fixture& a = fixture(GetParam().fixture);
  const std::string quant = GetParam().quant;
  const std::string device = GetParam().device;
  TempDir tmp;
  fs::path next1, next2;
};

// next1 (validated, plan recorded), then next2 and next1 again (by plan): each equals a fresh load
// of what it read, bit for bit, in the same storage, with the same counts as the full path.
TEST_P(ReloadPlan, RepeatedReloadsByPlanEqualFreshLoads) {
  auto model = load(a.dir);
  const auto ptrs = parameter_addresses(*model);
  const LoadReport first = model->reload(next1.string());
  EXPECT_FALSE(first.reload_by_plan);
  EXPECT_FALSE(first.reload_order_kept);
  expect_identical(kernel_state(*model), kernel_state(*load(next1)));
  for (const fs::path& dir : {next2, next1}) {
    SCOPED_TRACE(dir.string());
    const LoadReport r = model->reload(dir.string());
    EXPECT_EQ(r.reload_by_plan, GetParam().replays);
    EXPECT_EQ(r.reload_order_kept, !GetParam().replays);  // rebuilt modules: the order of the reload before
    EXPECT_TRUE(r.pointers_stable);
    EXPECT_EQ(r.layers_processed, first.layers_processed);
    EXPECT_EQ(r.untouched_modules, first.untouched_modules);
    expect_identical(kernel_state(*model), kernel_state(*load(dir)));
  }
  EXPECT_EQ(parameter_addresses(*model), ptrs);
}

// Other layouts take the full path. One tensor of another dtype (still a valid checkpoint: the
// loaders cast it) reloads as a fresh load of it does; one tensor missing fails with the error a
// model without a plan gives, word for word, and writes nothing.
TEST_P(ReloadPlan, OtherLayoutsAreValidatedAgain) {
  auto weights = read_checkpoint(next2);
  const std::string norm = "model.norm.weight";
  ASSERT_TRUE(weights.count(norm));
  const fs::path cast = tmp / "cast", missing = tmp / "missing";
  for (const fs::path& dir : {cast, missing}) {
    fs::create_directories(dir);
    fs::copy_file(next2 / "config.json", dir / "config.json");
  }
  std::vector<std::pair<std::string, at::Tensor>> cast_tensors, missing_tensors;
  for (auto& [name, t] : weights) {
    const bool is_norm = name == norm;
    cast_tensors.emplace_back(name, is_norm ? t.to(t.scalar_type() == at::kFloat ? at::kBFloat16 : at::kFloat) : t);
    if (!is_norm) missing_tensors.emplace_back(name, t);
  }
  save_tensors((cast / "model.safetensors").string(), cast_tensors);
  save_tensors((missing / "model.safetensors").string(), missing_tensors);

  auto model = load(a.dir);
  model->reload(next1.string());  // the plan of next1's layout
  EXPECT_EQ(model->reload(next2.string()).reload_by_plan, GetParam().replays);

  const std::string expected = error_of([&] { load(a.dir)->reload(missing.string()); });
  EXPECT_NE(expected.find(norm), std::string::npos) << expected;
  const auto before = kernel_state(*model);
  EXPECT_EQ(error_of([&] { model->reload(missing.string()); }), expected);
  expect_identical(kernel_state(*model), before);

  const LoadReport r = model->reload(cast.string());
  EXPECT_FALSE(r.reload_by_plan);
  EXPECT_FALSE(r.reload_order_kept);
  EXPECT_TRUE(r.pointers_stable);
  expect_identical(kernel_state(*model), kernel_state(*load(cast)));
}

// A reload by plan whose file changes half-way (the test hook of runtime/src/formats/change_hook.h
// truncates it after half its tensors): with a journal, every layer holds what it held before.
TEST_P(ReloadPlan, JournalUndoesAReloadByPlanThatFailsMidway) {
  auto model = load(a.dir);
  model->reload(next1.string());
  ASSERT_EQ(model->reload(next2.string()).reload_by_plan, GetParam().replays);
  const auto before = kernel_state(*model);
  const fs::path victim = next1 / "model.safetensors";
  const size_t half = read_checkpoint(next1).size() / 2;
  setenv("LOADKIT_TEST_CHANGE_FILE", ("truncate:" + std::to_string(half) + ":" + victim.string()).c_str(), 1);
  const std::string error = error_of([&] { model->reload(next1.string(), true, Rollback::Journal); });
  unsetenv("LOADKIT_TEST_CHANGE_FILE");
  EXPECT_NE(error.find(victim.string()), std::string::npos) << error;
  expect_identical(kernel_state(*model), before);
  EXPECT_TRUE(model->report().written_modules.empty());
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ReloadPlan,
    ::testing::Values(Case{"llama_fp32_gqa_sharded", "none", "cpu", true},
                      Case{"deepseek_v2_bf16_qlora", "none", "cpu", true},
                      Case{"deepseek_v2_bf16_qlora", "fp8", "cpu", false},  // online fp8: modules rebuilt
                      Case{"llama_blockfp8", "auto", "cpu", true}, Case{"qwen3_moe_blockfp8", "auto", "cpu", true},
                      Case{"deepseek_v2_bf16_qlora", "none", "cuda", true},
                      Case{"deepseek_v2_bf16_qlora", "fp8", "cuda", false},
                      Case{"llama_blockfp8", "auto", "cuda", true}, Case{"qwen3_moe_blockfp8", "auto", "cuda", true}),
    case_name);

}  // namespace
}  // namespace loadkit::test
