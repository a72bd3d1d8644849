// The CLI contract: exit codes and one clear error line for every bad input.

#include <gtest/gtest.h>

#include <sys/stat.h>

#include <functional>

#include "test_support.h"

namespace loadkit::test {
namespace {

using json = nlohmann::ordered_json;

class CliBadInput : public ::testing::Test {
 protected:
  const Fixture& base = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  fs::path model = copy_fixture(base, tmp / "model");

  CliResult load(const fs::path& dir) { return run_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()}); }
  CliResult load() { return load(model); }
  void edit_config(const std::function<void(json&)>& edit) {
    json cfg = json::parse(read_bytes(model / "config.json"));
    edit(cfg);
    write_bytes(model / "config.json", cfg.dump());
  }
};

// The staged path's knobs are read by every load (its read-ahead window): a value out of range is a
// usage error naming the variable, never a wrapped shift or a thread count the process cannot start.
TEST_F(CliBadInput, StagingKnobOutOfRangeIsExit2NamingIt) {
  for (const char* value : {"0", "-1", "-18446744073709551615", " 5", "abc", "17592186044416", "99999999999999999999999"}) {
    SCOPED_TRACE(value);
    expect_failure(run_cli({"load", "--model", model.string(), "--plugin-dir", plugin_dir()},
                           {{"LOADKIT_STAGING_WINDOW_MB", value}}),
                   2, {"LOADKIT_STAGING_WINDOW_MB", "is not an integer from 1 to 16777216"});
  }
}

TEST_F(CliBadInput, MissingModelDirectory) { expect_failure(load(tmp / "absent"), 3, {"absent", "does not exist"}); }

TEST_F(CliBadInput, MissingConfigJson) {
  fs::remove(model / "config.json");
  expect_failure(load(), 3, {(model / "config.json").string()});
}

TEST_F(CliBadInput, InvalidConfigJson) {
  write_bytes(model / "config.json", "{\"architectures\": [\"LlamaForCausalLM\"],");
  expect_failure(load(), 3, {(model / "config.json").string(), "invalid JSON"});
}

TEST_F(CliBadInput, ConfigMissingARequiredKey) {
  edit_config([](json& c) { c.erase("hidden_size"); });
  expect_failure(load(), 3, {"config.json", "'hidden_size'"});
}

TEST_F(CliBadInput, ConfigKeyOfWrongType) {
  edit_config([](json& c) { c["num_attention_heads"] = "six"; });
  expect_failure(load(), 3, {"config.json", "'num_attention_heads'", "integer"});
}

TEST_F(CliBadInput, EmptyArchitectures) {
  edit_config([](json& c) { c["architectures"] = json::array(); });
  expect_failure(load(), 3, {"config.json", "architectures"});
}

TEST_F(CliBadInput, UnknownArchitectureIsExit4) {
  edit_config([](json& c) { c["architectures"] = {"FancyNewForCausalLM"}; });
  expect_failure(load(), 4, {"'FancyNewForCausalLM'", plugin_dir()});
}

// Every row of the bad-input matrix, through `load` of the broken checkpoint and
// through `reload --from` it into a good model (the C++ side of the reload, with
// every tensor compared, is Reload.BadSourceLeavesEveryTensorUntouched).
class CliCorruptCheckpoint : public ::testing::TestWithParam<std::pair<Corruption, std::string>> {
 protected:
  /// A broken copy of `name` (indexed, three files: every corruption applies) and what its error must say.
  std::pair<fs::path, std::vector<std::string>> broken(const std::string& name) {
    fs::path model = copy_fixture(fixture(name), tmp / name);
    EXPECT_TRUE(applies(model, GetParam().first)) << name << " cannot hold " << GetParam().second;
    auto fragments = corrupt(model, GetParam().first);
    return {model, fragments};
  }
  TempDir tmp;
};

TEST_P(CliCorruptCheckpoint, LoadFailsWithExit3NamingTheCulprit) {
  auto [model, fragments] = broken("llama_fp32_gqa_sharded");
  expect_failure(run_cli({"load", "--model", model.string(), "--plugin-dir", plugin_dir()}), 3, fragments);
}

TEST_P(CliCorruptCheckpoint, ReloadFromItFailsWithExit3NamingTheCulprit) {
  auto [from, fragments] = broken("llama_fp32_gqa_b");
  expect_failure(run_cli({"reload", "--model", fixture("llama_fp32_gqa_sharded").dir, "--from", from.string(),
                          "--plugin-dir", plugin_dir()}),
                 3, fragments);
}

INSTANTIATE_TEST_SUITE_P(Cases, CliCorruptCheckpoint, ::testing::ValuesIn(all_corruptions()),
                         [](const auto& info) { return info.param.second; });

TEST_F(CliBadInput, ConfigDisagreeingWithWeightShapes) {
  edit_config([](json& c) { c["intermediate_size"] = 208; });
  expect_failure(load(), 3, {"model.layers.0.mlp.gate_proj.weight", "[200, 96]", "[208, 96]"});
}

// Paths that exist but cannot be used as a checkpoint directory, for `load --model`
// and `reload --from`. As root (CI) the CLI runs without root's permission
// bypass (drop_root_file_access), so a mode of 000 refuses it too.
struct BadPath {
  const char* name;
  const char* reason;  ///< strerror's text, in the one error line
  std::function<fs::path(const fs::path& model, const fs::path& tmp)> make;  ///< breaks `model`, returns the path to give
};

const BadPath kBadPaths[] = {
    {"PathComponentIsAFile", "Not a directory",
     [](const fs::path& model, const fs::path&) { return model / "config.json" / "model"; }},
    {"UnreadableDirectory", "Permission denied",
     [](const fs::path& model, const fs::path&) {
       fs::permissions(model, fs::perms::none);
       return model;
     }},
};

void PrintTo(const BadPath& path, std::ostream* os) { *os << path.name; }  // ctest shows the name, not bytes

class CliBadPath : public ::testing::TestWithParam<BadPath> {
 protected:
  CliResult run(const std::vector<std::string>& args) {
    CliResult r = run_cli(args, {}, drop_root_file_access);
    if (r.code == kChildSetupFailed) skip_reason = r.err;
    return r;
  }
  TempDir tmp;
  std::string skip_reason;
};

TEST_P(CliBadPath, LoadIsExit3NamingThePathAndTheReason) {
  fs::path model = copy_fixture(fixture("llama_fp32_gqa_sharded"), tmp / "model");
  const fs::path path = GetParam().make(model, tmp.path());
  auto r = run({"load", "--model", path.string(), "--plugin-dir", plugin_dir()});
  fs::permissions(model, fs::perms::owner_all, fs::perm_options::add);
  if (!skip_reason.empty()) GTEST_SKIP() << skip_reason;
  expect_failure(r, 3, {path.string(), GetParam().reason});
}

TEST_P(CliBadPath, ReloadFromItIsExit3NamingThePathAndTheReason) {
  fs::path from = copy_fixture(fixture("llama_fp32_gqa_b"), tmp / "b");
  const fs::path path = GetParam().make(from, tmp.path());
  auto r = run({"reload", "--model", fixture("llama_fp32_gqa_sharded").dir, "--from", path.string(), "--plugin-dir",
                plugin_dir()});
  fs::permissions(from, fs::perms::owner_all, fs::perm_options::add);
  if (!skip_reason.empty()) GTEST_SKIP() << skip_reason;
  expect_failure(r, 3, {path.string(), GetParam().reason});
}

INSTANTIATE_TEST_SUITE_P(Cases, CliBadPath, ::testing::ValuesIn(kBadPaths),
                         [](const auto& info) { return std::string(info.param.name); });

TEST_F(CliBadInput, PluginDirWithNonElfSoStillLoadsFromGoodPlugins) {
  write_bytes(tmp / "junk.so", "#!/bin/sh\n");
  auto r = run_cli({"load", "--model", model.string(), "--plugin-dir", tmp.path().string(), "--plugin-dir", plugin_dir()});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("junk.so"), std::string::npos) << "broken plugin not reported: " << r.err;
}

TEST_F(CliBadInput, ArchitectureOnlyABrokenPluginCouldServeIsExit4WithTheReason) {
  edit_config([](json& c) { c["architectures"] = {"BadAbiForCausalLM"}; });
  auto r = run_cli({"load", "--model", model.string(), "--plugin-dir", test_plugin_dir("bad_abi")});
  expect_failure(r, 4, {"'BadAbiForCausalLM'", "bad_abi.so is broken: Wrong ABI version on plugin 'bad_abi.so'. Got 2, supported 1."});
}

// ------------------------------------------------------------ usage errors

TEST(CliUsage, UnknownCommandIsExit2) { expect_failure(run_cli({"frobnicate"}), 2, {"'frobnicate'"}); }
TEST(CliUsage, UnknownOptionIsExit2) { expect_failure(run_cli({"load", "--modle", "x"}), 2, {"modle"}); }
TEST(CliUsage, MissingModelIsExit2) { expect_failure(run_cli({"load"}), 2, {"model"}); }
TEST(CliUsage, BadDeviceIsExit2) {
  expect_failure(run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--device", "tpu:3", "--plugin-dir", plugin_dir()}),
                 2, {"tpu:3"});
}
TEST(CliUsage, BadDtypeIsExit2) {
  expect_failure(run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--dtype", "int3", "--plugin-dir", plugin_dir()}),
                 2, {"int3"});
}
TEST(CliUsage, BadTokensAreExit2) {
  TempDir tmp;
  const auto& f = fixture("llama_bf16_mqa");
  expect_failure(run_cli({"logits", "--model", f.dir, "--tokens", "1,x,3", "--out", (tmp / "o").string()}), 2, {"'x'"});
  expect_failure(run_cli({"logits", "--model", f.dir, "--tokens", "1,515", "--out", (tmp / "o").string(),
                          "--plugin-dir", plugin_dir()}),
                 2, {"515", "vocabulary"});
}
TEST(CliUsage, CudaWithoutGpuIsExit2) {
  if (fs::exists("/dev/nvidiactl")) GTEST_SKIP() << "a GPU is present";
  expect_failure(run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--device", "cuda", "--plugin-dir", plugin_dir()}),
                 2, {"cuda", "no CUDA device"});
}

// ------------------------------------------------------ inspect, plugins list

TEST(CliInspect, ListsArchitecturePluginAndEveryTensor) {
  const auto& f = fixture("llama_fp32_gqa_sharded");
  auto r = run_cli({"inspect", "--model", f.dir, "--json", "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(fs::path(j["plugin"].get<std::string>()).filename(), "llama.so");
  auto index = nlohmann::json::parse(read_bytes(fs::path(f.dir) / "model.safetensors.index.json"));
  EXPECT_EQ(j["tensors"].get<size_t>(), index["weight_map"].size());
  auto r2 = run_cli({"inspect", "--model", f.dir, "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r2.code, 0);
  EXPECT_NE(r2.out.find("model.layers.2.mlp.down_proj.weight"), std::string::npos);
}

TEST(CliPlugins, JsonListsStatusOfEachFile) {
  TempDir tmp;
  write_bytes(tmp / "junk.so", "junk");
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", tmp.path().string(), "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  std::map<std::string, std::string> status;
  for (auto& p : j["plugins"]) status[fs::path(p["file"].get<std::string>()).filename()] = p["status"];
  EXPECT_EQ(status["llama.so"], "ok");
  EXPECT_EQ(status["junk.so"].rfind("broken: cannot open", 0), 0u) << status["junk.so"];
}

TEST(CliPlugins, ListsQwen2AndGemmaWithTheirPlugins) {
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  std::map<std::string, std::string> plugin_of;  // architecture → plugin file
  auto j = nlohmann::json::parse(r.out);
  for (auto& p : j["plugins"])
    for (auto& arch : p["architectures"])
      plugin_of[arch.get<std::string>()] = fs::path(p["file"].get<std::string>()).filename();
  EXPECT_EQ(plugin_of["Qwen2ForCausalLM"], "qwen2.so");
  EXPECT_EQ(plugin_of["GemmaForCausalLM"], "gemma.so");
  EXPECT_EQ(plugin_of["Gemma2ForCausalLM"], "gemma.so");
  auto text = run_cli({"plugins", "list", "--plugin-dir", plugin_dir()});
  ASSERT_EQ(text.code, 0) << text.err;
  EXPECT_NE(text.out.find("Gemma2ForCausalLM"), std::string::npos) << text.out;
}

}  // namespace
}  // namespace loadkit::test
