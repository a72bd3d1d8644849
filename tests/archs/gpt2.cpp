// GPT-2 (plugins/gpt2): Conv1D [in, out] weights, both checkpoint spellings (with and without the
// `transformer.` prefix, the latter with the old attn.bias buffers), layer-scaled and unscaled attention.
#include "arch_suite.h"
#include "test_support.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Gpt2, "gpt2_fp32_prefixed", "gpt2_fp32_unprefixed", "gpt2_fp32_layer_scaled",
                      "gpt2_bf16_untied", "gpt2_bf16_tied", "gpt2_bf16_tied_unprefixed");
LOADKIT_ARCH_RELOADS(Gpt2, "gpt2_bf16_untied");

namespace {

// The plugin refuses positions it has no embedding for; the error, thrown from plugin code during
// the forward, must reach the CLI as one line and exit 3 (not crash once the plugin is unloaded).
TEST(Gpt2Cli, MoreTokensThanLearnedPositionsIsExit3NamingNPositions) {
  const auto& f = fixture("gpt2_fp32_prefixed");  // n_positions 40
  std::string tokens;
  for (int i = 0; i < 41; ++i) tokens += (i ? "," : "") + std::to_string(i);
  TempDir tmp;
  auto r = run_cli({"logits", "--model", f.dir, "--tokens", tokens, "--out", (tmp / "l.safetensors").string(),
                    "--device", "cpu", "--plugin-dir", plugin_dir()});
  EXPECT_EQ(r.code, 3) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  EXPECT_NE(r.error_lines()[0].find("41 tokens exceed the model's 40 learned positions (n_positions)"),
            std::string::npos)
      << r.err;
}

}  // namespace
LOADKIT_ARCH_TP_FIXTURES(Gpt2, "gpt2_fp32_tp3");

}  // namespace loadkit::test
