// examples/plugin_template's Granite as a user runs it: the documented job
// (configs/granite_plugin.yaml) with the plugin found through a plugin directory,
// its logits checked here against transformers' independently of the job's own
// verify step. (Built against the installed SDK: sdk.installed_plugin.)

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "model_checks.h"
#include "tensor_io.h"

namespace loadkit::test {
namespace {

TEST(PluginTemplate, GraniteJobThroughAPluginDirectoryMatchesTransformers) {
  TempDir tmp;
  const CliResult r = run_cli({"run", LOADKIT_TEST_CONFIGS_DIR "/granite_plugin.yaml", "--log-level", "warn"},
                              {{"LOADKIT_FIXTURES", fixtures_dir()},
                               {"LOADKIT_OUT", tmp.path().string()},
                               {"LOADKIT_PLUGINS", plugin_dir()}});
  ASSERT_EQ(r.code, 0) << r.err;
  const auto tensors = load_tensors((tmp / "granite_logits.safetensors").string());
  ASSERT_EQ(tensors.size(), 1u);
  const Fixture& f = fixture("granite_fp32_gqa");
  expect_close(tensors[0].second, reference_logits(f), f.dtype);
}

}  // namespace
}  // namespace loadkit::test
