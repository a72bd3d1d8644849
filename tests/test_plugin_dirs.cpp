// Hot-drop plugin directories through the CLI: what `plugins list` shows for
// each kind of file, and exit 4 naming the broken plugin when a model needs
// an architecture only a broken plugin could have served.

#include <gtest/gtest.h>

#include "test_support.h"

namespace loadkit::test {
namespace {

/// A directory with one broken plugin of each kind, copied from the build.
struct BrokenKind {
  const char* name;
  const char* file;    ///< as dropped into the directory
  const char* status;  ///< the listing's status starts with this
};

const BrokenKind kBroken[] = {
    {"WrongAbiVersion", "bad_abi.so", "broken: Wrong ABI version on plugin 'bad_abi.so'. Got 2, supported 1."},
    {"WrongTorchVersion", "wrong_torch.so", "broken: Wrong torch version on plugin 'wrong_torch.so'. Got 1.13.1, host has "},
    {"MissingEntrySymbol", "no_entry.so", "broken: no entry symbol 'loadkit_plugin_v1'"},
    {"TextFileNamedSo", "notes.so", "broken: cannot open: "},
    {"RegistrationReportsAnError", "throwing.so", "broken: registration failed: cannot register: config table corrupt"},
    {"SymlinkLoop", "loop_a.so", "broken: cannot open: symlink to 'loop_b.so': Too many levels of symbolic links"},
    {"SymlinkToItself", "self.so", "broken: cannot open: symlink to 'self.so': Too many levels of symbolic links"},
    {"DanglingSymlink", "dangling.so", "broken: cannot open: symlink to 'gone.so': No such file or directory"},
};

void PrintTo(const BrokenKind& kind, std::ostream* os) { *os << kind.name; }  // ctest shows the name, not bytes

const BrokenKind& broken_kind(std::string_view name) {
  for (const auto& k : kBroken)
    if (name == k.name) return k;
  throw std::runtime_error("no broken plugin kind " + std::string(name));
}

fs::path drop(const BrokenKind& kind, const fs::path& dir) {
  fs::create_directories(dir);
  const std::string file = kind.file;
  if (file == "notes.so") {
    write_bytes(dir / file, "these are notes, saved with the wrong extension\n");
  } else if (file == "loop_a.so") {
    fs::create_symlink("loop_b.so", dir / "loop_a.so");
    fs::create_symlink("loop_a.so", dir / "loop_b.so");
  } else if (file == "self.so") {
    fs::create_symlink("self.so", dir / "self.so");
  } else if (file == "dangling.so") {
    fs::create_symlink("gone.so", dir / "dangling.so");
  } else {
    const std::string stem = file.substr(0, file.size() - 3);
    fs::copy_file(test_plugin_dir(stem) + "/" + file, dir / file);
  }
  return dir / file;
}

std::map<std::string, nlohmann::json> by_file(const nlohmann::json& listing) {
  std::map<std::string, nlohmann::json> out;
  for (const auto& p : listing["plugins"]) out[p["file"].get<std::string>()] = p;
  return out;
}

class BrokenPlugin : public ::testing::TestWithParam<BrokenKind> {};

TEST_P(BrokenPlugin, IsListedWithItsReasonAndNeverStopsTheOthers) {
  TempDir tmp;
  const fs::path file = drop(GetParam(), tmp / "plugins");
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", (tmp / "plugins").string(), "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto plugins = by_file(nlohmann::json::parse(r.out));
  ASSERT_TRUE(plugins.count(file.string())) << r.out;
  const std::string status = plugins[file.string()]["status"];
  EXPECT_EQ(status.rfind(GetParam().status, 0), 0u) << status;
  EXPECT_EQ(plugins[plugin_dir() + "/llama.so"]["status"], "ok");
  EXPECT_EQ(plugins[plugin_dir() + "/qwen3.so"]["status"], "ok");
}

TEST_P(BrokenPlugin, NeededIsExit4NamingTheFileAndReason) {
  TempDir tmp;
  const fs::path file = drop(GetParam(), tmp / "plugins");
  const fs::path model = copy_fixture(fixture("llama_bf16_mqa"), tmp / "model");
  auto config = nlohmann::json::parse(read_bytes(model / "config.json"));
  config["architectures"] = {"HotDroppedForCausalLM"};  // what the dropped plugin was meant to serve
  write_bytes(model / "config.json", config.dump());
  auto r = run_cli({"load", "--model", model.string(), "--plugin-dir", (tmp / "plugins").string(), "--log-level", "error"});
  EXPECT_EQ(r.code, 4) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  const std::string line = r.error_lines()[0];
  EXPECT_NE(line.find("'HotDroppedForCausalLM'"), std::string::npos) << line;
  EXPECT_NE(line.find(std::string(GetParam().file) + " is " + GetParam().status), std::string::npos) << line;
}

// A broken file first in the search order: a model that a good plugin serves loads anyway, and the broken
// one is reported on stderr as a warning, not an error.
TEST_P(BrokenPlugin, UnneededNeverStopsALoad) {
  TempDir tmp;
  const fs::path file = drop(GetParam(), tmp / "plugins");
  auto r = run_cli({"load", "--model", fixture("llama_bf16_mqa").dir, "--plugin-dir", (tmp / "plugins").string(),
                    "--plugin-dir", plugin_dir()});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(r.error_lines().empty()) << r.err;
  EXPECT_NE(r.err.find(file.string()), std::string::npos) << "broken plugin not reported: " << r.err;
}

INSTANTIATE_TEST_SUITE_P(Kinds, BrokenPlugin, ::testing::ValuesIn(kBroken),
                         [](const auto& info) { return std::string(info.param.name); });

// throwing.so adds ThrowingForCausalLM, then throws: what it added before throwing is not served.
TEST(PluginDirs, ArchitectureAddedBeforeTheHookThrewIsExit4NamingThePlugin) {
  TempDir tmp;
  drop(broken_kind("RegistrationReportsAnError"), tmp / "plugins");
  const fs::path model = copy_fixture(fixture("llama_bf16_mqa"), tmp / "model");
  auto config = nlohmann::json::parse(read_bytes(model / "config.json"));
  config["architectures"] = {"ThrowingForCausalLM"};
  write_bytes(model / "config.json", config.dump());
  auto r = run_cli({"load", "--model", model.string(), "--plugin-dir", (tmp / "plugins").string(), "--plugin-dir",
                    plugin_dir(), "--log-level", "error"});
  EXPECT_EQ(r.code, 4) << r.err;
  ASSERT_EQ(r.error_lines().size(), 1u) << r.err;
  const std::string line = r.error_lines()[0];
  EXPECT_NE(line.find("no plugin serves architecture 'ThrowingForCausalLM'"), std::string::npos) << line;
  EXPECT_NE(line.find("throwing.so is broken: registration failed: cannot register: config table corrupt"),
            std::string::npos) << line;
}

// Both ends of a two-link loop are listed; the plugin directory itself being a loop is a warning, not a stop.
TEST(PluginDirs, SymlinkLoopsAreListedAtBothEndsAndALoopedDirectoryIsSkipped) {
  TempDir tmp;
  drop(broken_kind("SymlinkLoop"), tmp / "plugins");
  fs::create_symlink("looped", tmp / "looped");
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", (tmp / "looped").string(), "--plugin-dir",
                    (tmp / "plugins").string(), "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto plugins = by_file(nlohmann::json::parse(r.out));
  EXPECT_EQ(plugins[(tmp / "plugins" / "loop_b.so").string()]["status"],
            "broken: cannot open: symlink to 'loop_a.so': Too many levels of symbolic links");
  EXPECT_EQ(plugins[plugin_dir() + "/llama.so"]["status"], "ok");
  EXPECT_NE(r.err.find((tmp / "looped").string() + ": cannot access: Too many levels of symbolic links"),
            std::string::npos) << r.err;
}

TEST(PluginDirs, ListingShowsNameVersionArchitecturesAndBuildVersions) {
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto plugins = by_file(nlohmann::json::parse(r.out));
  const auto& q = plugins[plugin_dir() + "/qwen3.so"];
  EXPECT_EQ(q["name"], "qwen3");
  EXPECT_EQ(q["version"], "0.1.0");
  EXPECT_EQ(q["architectures"], nlohmann::json::array({"Qwen3ForCausalLM"}));
  EXPECT_EQ(q["abi_version"], 1);
  EXPECT_EQ(q["sdk_version"], "1.0.0");
  EXPECT_EQ(q["torch_version"], plugins[plugin_dir() + "/llama.so"]["torch_version"]);
  EXPECT_FALSE(q["torch_version"].get<std::string>().empty());
  EXPECT_EQ(plugins[plugin_dir() + "/quant.so"]["quantization_methods"],
            nlohmann::json::array({"fp8", "compressed-tensors", "int8"}));
  // The text form carries the same facts.
  auto text = run_cli({"plugins", "list", "--plugin-dir", plugin_dir()});
  ASSERT_EQ(text.code, 0);
  EXPECT_NE(text.out.find("plugin:        qwen3 0.1.0"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("built with:    sdk 1.0.0, abi 1, torch " + q["torch_version"].get<std::string>()),
            std::string::npos) << text.out;
}

TEST(PluginDirs, TwoPluginsClaimingOneArchitectureFirstWinsOtherShadowed) {
  auto r = run_cli({"plugins", "list", "--json", "--plugin-dir", test_plugin_dir("dup_llama"), "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto plugins = by_file(nlohmann::json::parse(r.out));
  EXPECT_EQ(plugins[plugin_dir() + "/llama.so"]["status"], "shadowed by " + test_plugin_dir("dup_llama") + "/dup_llama.so");
  EXPECT_EQ(plugins[test_plugin_dir("dup_llama") + "/dup_llama.so"]["status"], "ok");
}

TEST(PluginDirs, HotDroppedCopyServesBeforeTheDefaultDirectory) {
  TempDir tmp;
  fs::create_directories(tmp / "fresh");
  fs::copy_file(plugin_dir() + "/qwen3.so", tmp / "fresh" / "qwen3.so");
  const std::string fresh = (tmp / "fresh").string();
  auto r = run_cli({"inspect", "--json", "--model", fixture("qwen3_fp32_gqa").dir, "--plugin-dir", fresh});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out)["plugin"], fresh + "/qwen3.so");
  auto list = run_cli({"plugins", "list", "--json", "--plugin-dir", fresh});
  auto plugins = by_file(nlohmann::json::parse(list.out));
  EXPECT_EQ(plugins[plugin_dir() + "/qwen3.so"]["status"], "shadowed by " + fresh + "/qwen3.so");
}

}  // namespace
}  // namespace loadkit::test
