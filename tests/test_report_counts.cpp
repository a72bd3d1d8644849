// What a report's layer counts mean, the same for every operation
// (loadkit/runtime/reload_types.h): a layer is a module that owns parameters,
// a parameter shared by two modules belonging to the first; layers_processed
// counts the layers an operation wrote, layers_delayed those written at the end.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <set>
#include <unordered_set>

#include "loadkit/causal_lm.h"
#include "loadkit/module.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

/// The model's layers, from its tree: each module that owns a parameter no earlier module owns.
std::vector<std::string> layers(LoadedModel& m) {
  std::vector<std::string> out;
  std::unordered_set<const Parameter*> seen;
  for (const auto& [name, module] : m.model().named_modules()) {
    bool owns = false;
    for (const auto& [pname, p] : module->parameters()) owns = seen.insert(p.get()).second || owns;
    if (owns) out.push_back(name);
  }
  return out;
}

class LayerCounts : public ::testing::TestWithParam<std::string> {
 protected:
  const Fixture& a() const { return fixture(GetParam()); }
};

TEST_P(LayerCounts, LoadCountsEveryLayer) {
  auto model = load_model(a().dir);
  EXPECT_EQ(model->report().layers_processed, static_cast<int>(layers(*model).size()));
  EXPECT_EQ(model->report().layers_delayed, 0);
  EXPECT_TRUE(model->report().pointers_stable);
}

TEST_P(LayerCounts, ReloadCountsEveryLayerPlainAndQuantized) {
  for (const std::string quant : {"none", "int8"}) {
    auto model = load_model(a().dir, "cpu", quant);
    const LoadReport& r = model->reload(a().dir);
    EXPECT_EQ(r.layers_processed + r.layers_delayed, static_cast<int>(layers(*model).size())) << quant;
    EXPECT_TRUE(r.untouched_modules.empty()) << quant;
    EXPECT_TRUE(r.pointers_stable) << quant;
  }
}

TEST_P(LayerCounts, KernelFormatCopyCountsTheLayersItWrote) {
  auto model = load_model(a().dir, "cpu", "int8");
  TempDir tmp;
  std::vector<std::pair<std::string, at::Tensor>> kernel;
  for (auto& [name, p] : model->model().named_parameters()) kernel.emplace_back(name, p->data);
  fs::create_directories(tmp / "kernel");
  save_tensors((tmp / "kernel" / "model.safetensors").string(), kernel);
  const LoadReport& r = model->reload((tmp / "kernel").string(), /*process=*/false);
  EXPECT_EQ(r.layers_processed, static_cast<int>(layers(*model).size()));
  EXPECT_EQ(r.layers_delayed, 0);
  EXPECT_TRUE(r.pointers_stable);
}

TEST_P(LayerCounts, ShardedStateCountsTheLayersItWrote) {
  TempDir tmp;
  const CliResult saved = run_cli({"save-sharded", "--model", a().dir, "--out", (tmp / "s").string(), "--plugin-dir",
                                   plugin_dir()});
  ASSERT_EQ(saved.code, 0) << saved.err;
  auto model = load_model(a().dir);
  const LoadReport& r = model->reload((tmp / "s").string(), /*process=*/false);
  EXPECT_EQ(r.layers_processed, static_cast<int>(layers(*model).size()));
  auto sharded = load_model((tmp / "s").string(), "cpu", "none", "auto", "sharded");
  EXPECT_EQ(sharded->report().layers_processed, static_cast<int>(layers(*sharded).size()));
}

TEST_P(LayerCounts, UpdateCountsOnlyTheLayersItTouched) {
  auto model = load_model(a().dir);
  const auto all = layers(*model);
  std::vector<NamedWeight> one;
  for (auto& w : loadkit::read_checkpoint(a().dir))
    if (w.name == "model.norm.weight") one.push_back(w);
  ASSERT_EQ(one.size(), 1u);
  model->begin_update();
  model->update(one);
  const LoadReport& r = model->finish_update();
  EXPECT_EQ(r.layers_processed, 1);
  EXPECT_EQ(r.untouched_modules.size(), all.size() - 1);
  EXPECT_EQ(std::count(r.untouched_modules.begin(), r.untouched_modules.end(), "model.norm"), 0);
}

// Untied, and tied (the shared embedding counts once, for its first owner).
INSTANTIATE_TEST_SUITE_P(Llama, LayerCounts, ::testing::Values("llama_fp32_gqa_sharded", "llama_fp32_llama3_tied"));

}  // namespace
}  // namespace loadkit::test
