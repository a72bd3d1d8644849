// Every architecture against transformers: logits through the C++ API and the
// CLI, online fp8/int8 quantization, and reload = fresh load. The fixtures of
// each family are listed in tests/archs/<family>.cpp.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "arch_suite.h"
#include "device_skip.h"
#include "loadkit/runtime/engine.h"
#include "model_checks.h"
#include "tensor_io.h"
#include "test_support.h"

namespace loadkit::test {

std::set<std::string>& covered_fixtures() {
  static std::set<std::string> names;
  return names;
}

bool cover(std::initializer_list<const char*> names) {
  for (const char* n : names) covered_fixtures().insert(n);
  return true;
}

std::string arch_param_name(const ::testing::TestParamInfo<ArchParam>& info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param);
}

std::string arch_quant_param_name(const ::testing::TestParamInfo<ArchQuantParam>& info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param) + "_" + std::get<2>(info.param);
}

namespace {

TEST_P(ArchLogits, ApiMatchesTransformers) {
  const auto& [name, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& f = fixture(name);
  auto model = load_model(f.dir, device);
  expect_close(model->logits(f.tokens), reference_logits(f), f.dtype);
}

TEST_P(ArchLogits, CliMatchesTransformers) {
  const auto& [name, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& f = fixture(name);
  TempDir tmp;
  const std::string out = (tmp / "logits.safetensors").string();
  auto r = run_cli({"logits", "--model", f.dir, "--tokens", f.tokens_arg(), "--out", out, "--device", device,
                    "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto tensors = load_tensors(out);
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors[0].first, "logits");
  expect_close(tensors[0].second, reference_logits(f), f.dtype);
}

TEST_P(ArchQuantized, CloseToUnquantizedTransformers) {
  const auto& [name, quant, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& f = fixture(name);
  auto model = load_model(f.dir, device, quant);
  at::Tensor cos = at::cosine_similarity(model->logits(f.tokens), reference_logits(f), 1);
  EXPECT_GE(cos.min().item<double>(), quant == "fp8" ? 0.99 : 0.995);
}

TEST_P(ArchReload, EqualsFreshLoadAndBack) {
  const auto& [name, quant, device] = GetParam();
  SKIP_WITHOUT(device);
  const auto& a = fixture(name);
  ASSERT_FALSE(a.reload_target.empty()) << name << " has no reload_target in the fixture manifest";
  const auto& b = fixture(a.reload_target);
  auto model = load_model(a.dir, device, quant);
  const auto fresh_a = kernel_state(*model);

  EXPECT_TRUE(model->reload(b.dir).pointers_stable);
  auto fresh_b = load_model(b.dir, device, quant);
  expect_identical(kernel_state(*model), kernel_state(*fresh_b));
  EXPECT_TRUE(at::equal(model->logits(b.tokens), fresh_b->logits(b.tokens)));

  model->reload(a.dir);
  expect_identical(kernel_state(*model), fresh_a);
}

// Families that have a reload target instantiate it; llama's reloads live in test_reload.
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(ArchReload);

TEST(ArchSuite, EveryFixtureIsCovered) {
  std::set<std::string> targets;
  for (const auto& f : fixtures())
    if (!f.reload_target.empty()) targets.insert(f.reload_target);
  for (const auto& f : fixtures())
    EXPECT_TRUE(covered_fixtures().count(f.name) || targets.count(f.name))
        << f.name << " (" << f.architecture << ") is generated but no tests/archs/*.cpp lists it";
}

}  // namespace
}  // namespace loadkit::test
