// Errors raised inside a plugin reach the user as one line and an exit code,
// whatever command they surface through, and never as a signal.
//
// The case this guards: a loadkit::Error thrown by plugin code is still in
// flight, or caught, after the registry that held the plugin unloaded it (the
// CLI's main catches a failed load's error once the command's registry is gone).
// Its type must not live in the plugin (sdk/include/loadkit/error.h), or the
// catch reads an unmapped vtable. Each config below makes a plugin throw while
// the model is built; every command that loads a model must then exit 3 with
// one line naming config.json.

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "device_skip.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

using json = nlohmann::ordered_json;

/// A fixture's config broken in a way its plugin refuses (the plugin, not the SDK, throws).
struct BadConfig {
  std::string name;     ///< test-name suffix
  std::string fixture;  ///< a good checkpoint of that architecture
  std::function<void(json&)> edit;
  std::vector<std::string> fragments;  ///< besides config.json, what the line must name
};

const std::vector<BadConfig>& bad_configs() {
  static const std::vector<BadConfig> cases = {
      {"LlamaGeluActivation", "llama_fp32_gqa_sharded", [](json& c) { c["hidden_act"] = "gelu"; }, {"hidden_act"}},
      {"Gpt2EmbeddingNotAMultipleOfHeads", "gpt2_fp32_prefixed",
       [](json& c) { c["n_head"] = c["n_embd"].get<int64_t>() % 7 == 0 ? 11 : 7; }, {"n_embd"}},
      {"Qwen2ZeroHeads", "qwen2_fp32_gqa_untied", [](json& c) { c["num_attention_heads"] = 0; }, {}},
      {"DeepseekV2GroupedRoutingWithoutGroups", "deepseek_v2_fp32_qlora_grouped_yarn",
       [](json& c) { c["n_group"] = 0; }, {"n_group"}},
  };
  return cases;
}

/// The commands that load a model, each given the broken checkpoint as --model.
struct Command {
  std::string name;
  std::function<std::vector<std::string>(const fs::path& model, const Fixture& good, const fs::path& tmp)> args;
};

const std::vector<Command>& commands() {
  static const std::vector<Command> list = {
      {"Load", [](const fs::path& m, const Fixture&, const fs::path&) -> std::vector<std::string> {
         return {"load", "--model", m.string()};
       }},
      {"Logits", [](const fs::path& m, const Fixture& good, const fs::path& tmp) -> std::vector<std::string> {
         return {"logits", "--model", m.string(), "--tokens", good.tokens_arg(), "--out", (tmp / "l.safetensors").string()};
       }},
      {"Reload", [](const fs::path& m, const Fixture& good, const fs::path&) -> std::vector<std::string> {
         return {"reload", "--model", m.string(), "--from", good.dir};
       }},
      {"SaveSharded", [](const fs::path& m, const Fixture&, const fs::path& tmp) -> std::vector<std::string> {
         return {"save-sharded", "--model", m.string(), "--out", (tmp / "sharded").string()};
       }},
      {"RunJob", [](const fs::path& m, const Fixture&, const fs::path& tmp) -> std::vector<std::string> {
         write_bytes(tmp / "job.yaml", "model:\n  path: " + m.string() + "\nsteps:\n  - load\n");
         return {"run", (tmp / "job.yaml").string()};
       }},
  };
  return list;
}

/// A copy of the case's fixture with its config broken.
fs::path broken_copy(const BadConfig& c, const fs::path& dest) {
  const fs::path model = copy_fixture(fixture(c.fixture), dest);
  json cfg = json::parse(read_bytes(model / "config.json"));
  c.edit(cfg);
  write_bytes(model / "config.json", cfg.dump());
  return model;
}

class PluginConfigError : public ::testing::TestWithParam<std::tuple<size_t, size_t>> {};

TEST_P(PluginConfigError, IsExit3WithOneLineNamingTheConfig) {
  const BadConfig& c = bad_configs()[std::get<0>(GetParam())];
  const Command& command = commands()[std::get<1>(GetParam())];
  TempDir tmp;
  const fs::path model = broken_copy(c, tmp / "model");
  auto args = command.args(model, fixture(c.fixture), tmp.path());
  if (command.name == "RunJob") {
    write_bytes(tmp / "job.yaml", read_bytes(tmp / "job.yaml") + "plugin_dirs: [" + plugin_dir() + "]\n");
  } else {
    args.insert(args.end(), {"--plugin-dir", plugin_dir()});
  }
  const CliResult r = run_cli(args);
  ASSERT_LT(r.code, 128) << "killed by signal " << r.code - 128 << "\n" << r.err;
  std::vector<std::string> fragments = c.fragments;
  fragments.push_back((model / "config.json").string());
  expect_failure(r, 3, fragments);
  EXPECT_FALSE(fs::exists(tmp / "l.safetensors"));
  EXPECT_FALSE(fs::exists(tmp / "sharded"));
}

INSTANTIATE_TEST_SUITE_P(
    EveryPluginEveryCommand, PluginConfigError,
    ::testing::Combine(::testing::Range<size_t>(0, bad_configs().size()), ::testing::Range<size_t>(0, commands().size())),
    [](const ::testing::TestParamInfo<std::tuple<size_t, size_t>>& info) {
      return bad_configs()[std::get<0>(info.param)].name + "_" + commands()[std::get<1>(info.param)].name;
    });

// An error the plugin raises in its forward rather than while building: the model, and so the
// plugin, is still alive when it is thrown, but not when main catches it.
TEST(PluginForwardError, TooManyTokensForGpt2PositionsIsExit3) {
  const Fixture& f = fixture("gpt2_fp32_prefixed");
  TempDir tmp;
  std::string tokens = "1";
  for (int i = 0; i < 40; ++i) tokens += ",1";  // 41 tokens, the fixture has 40 positions
  for (const std::string command : {"logits", "reload"}) {
    std::vector<std::string> args = {command, "--model", f.dir, "--tokens", tokens, "--out",
                                     (tmp / "l.safetensors").string(), "--plugin-dir", plugin_dir()};
    if (command == "reload") args.insert(args.begin() + 3, {"--from", f.dir});
    const CliResult r = run_cli(args);
    ASSERT_LT(r.code, 128) << command << ": killed by signal " << r.code - 128 << "\n" << r.err;
    expect_failure(r, 3, {"41 tokens", "40"});
  }
}

// The same through ranks that each run the plugin: every rank raises it, the launcher reports one.
TEST(PluginConfigErrorOnRanks, IsExit3WithOneLine) {
  SKIP_WITHOUT_TP_BACKEND(std::string("cpu"));
  const BadConfig& c = bad_configs()[0];
  TempDir tmp;
  const fs::path model = broken_copy(c, tmp / "model");
  const CliResult r = run_cli({"load", "--model", model.string(), "--tp-size", "2", "--plugin-dir", plugin_dir()});
  ASSERT_LT(r.code, 128) << "killed by signal " << r.code - 128 << "\n" << r.err;
  expect_failure(r, 3, {"hidden_act", (model / "config.json").string()});
}

}  // namespace
}  // namespace loadkit::test
