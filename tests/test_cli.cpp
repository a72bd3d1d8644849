// The CLI contract: exit codes and one clear error line for every bad input.

#include <gtest/gtest.h>

#include <sys/stat.h>

#include "test_support.h"

namespace loadkit::test {
namespace {

using json = nlohmann::ordered_json;

/// Exit code `code`, exactly one error line on stderr naming every fragment, no crash or trace.
void expect_failure(const CliResult& r, int code, std::initializer_list<std::string> fragments) {
  EXPECT_EQ(r.code, code) << r.err;
  auto lines = r.error_lines();
  ASSERT_EQ(lines.size(), 1u) << r.err;
  for (const auto& f : fragments) EXPECT_NE(lines[0].find(f), std::string::npos) << "'" << f << "' not in: " << lines[0];
  for (const char* bad : {"Exception raised from", "terminate called", "Traceback", "frame #"})
    EXPECT_EQ(r.err.find(bad), std::string::npos) << r.err;
}

class CliBadInput : public ::testing::Test {
 protected:
  const Fixture& base = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  fs::path model = copy_fixture(base, tmp / "model");

  CliResult load(const fs::path& dir) { return run_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()}); }
  CliResult load() { return load(model); }
  fs::path shard_of(const std::string& tensor) { return file_holding(model, tensor); }
  void edit_config(const std::function<void(json&)>& edit) {
    json cfg = json::parse(read_bytes(model / "config.json"));
    edit(cfg);
    write_bytes(model / "config.json", cfg.dump());
  }
};

const std::string kQ = "model.layers.1.self_attn.q_proj.weight";

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

TEST_F(CliBadInput, TruncatedShard) {
  fs::path shard = shard_of(kQ);
  fs::resize_file(shard, fs::file_size(shard) - 7);
  expect_failure(load(), 3, {shard.string(), "truncated"});
}

TEST_F(CliBadInput, HeaderLengthBeyondFile) {
  fs::path shard = shard_of(kQ);
  std::string bytes = read_bytes(shard);
  bytes[5] = '\x01';
  write_bytes(shard, bytes);
  expect_failure(load(), 3, {shard.string(), "header length"});
}

TEST_F(CliBadInput, OverlappingOffsets) {
  fs::path shard = shard_of(kQ);
  auto raw = RawSafetensors::read(shard);
  std::vector<std::string> names;
  for (auto& [k, v] : raw.header.items())
    if (k != "__metadata__") names.push_back(k);
  ASSERT_GE(names.size(), 1u);
  // Duplicate q_proj's bytes range under a second name: two tensors over one range.
  raw.header["model.layers.1.extra.weight"] = raw.header[kQ];
  raw.write(shard);
  expect_failure(load(), 3, {shard.string(), "overlap"});
}

TEST_F(CliBadInput, UnknownDtype) {
  fs::path shard = shard_of(kQ);
  auto raw = RawSafetensors::read(shard);
  raw.header[kQ]["dtype"] = "F12";
  raw.write(shard);
  expect_failure(load(), 3, {shard.string(), kQ, "unknown dtype 'F12'"});
}

TEST_F(CliBadInput, NumelBytesMismatch) {
  fs::path shard = shard_of(kQ);
  auto raw = RawSafetensors::read(shard);
  raw.header[kQ]["shape"] = {95, 96};
  raw.write(shard);
  expect_failure(load(), 3, {shard.string(), kQ, "bytes"});
}

TEST_F(CliBadInput, IndexPointsAtMissingFile) {
  fs::path shard = shard_of(kQ);
  fs::remove(shard);
  expect_failure(load(), 3, {"model.safetensors.index.json", shard.filename().string(), "missing file"});
}

TEST_F(CliBadInput, UnexpectedTensorName) {
  fs::path shard = shard_of(kQ);
  auto raw = RawSafetensors::read(shard);
  json entry = raw.header[kQ];
  raw.header.erase(kQ);
  raw.header["model.layers.1.self_attn.query.weight"] = entry;
  raw.write(shard);
  json index = json::parse(read_bytes(model / "model.safetensors.index.json"));
  index["weight_map"]["model.layers.1.self_attn.query.weight"] = index["weight_map"][kQ];
  index["weight_map"].erase(kQ);
  write_bytes(model / "model.safetensors.index.json", index.dump());
  expect_failure(load(), 3, {"There is no module or parameter named 'model.layers.1.self_attn.query' in LlamaAttention",
                             shard.string()});
}

TEST_F(CliBadInput, MissingWeight) {
  fs::path shard = shard_of("model.norm.weight");
  auto raw = RawSafetensors::read(shard);
  // Drop model.norm.weight; keep the file consistent by keeping only tensors before it.
  json header = json::object();
  std::string data;
  for (auto& [k, v] : raw.header.items()) {
    if (k == "__metadata__" || k == "model.norm.weight") continue;
    uint64_t b = v["data_offsets"][0], e = v["data_offsets"][1];
    json entry = v;
    entry["data_offsets"] = {data.size(), data.size() + (e - b)};
    data += raw.data.substr(b, e - b);
    header[k] = entry;
  }
  raw.header = header;
  raw.data = data;
  raw.write(shard);
  json index = json::parse(read_bytes(model / "model.safetensors.index.json"));
  index["weight_map"].erase("model.norm.weight");
  write_bytes(model / "model.safetensors.index.json", index.dump());
  expect_failure(load(), 3, {"Some weights are not initialized from checkpoints: model.norm.weight"});
}

TEST_F(CliBadInput, WrongShapedWeight) {
  edit_config([](json& c) { c["intermediate_size"] = 208; });
  expect_failure(load(), 3, {"model.layers.0.mlp.gate_proj.weight", "[200, 96]", "[208, 96]"});
}

TEST_F(CliBadInput, UnreadableModelDirectory) {
  if (geteuid() == 0) GTEST_SKIP() << "root reads any directory; permissions cannot be tested as root";
  fs::permissions(model, fs::perms::none);
  auto r = load();
  fs::permissions(model, fs::perms::owner_all);
  expect_failure(r, 3, {model.string()});
}

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

}  // namespace
}  // namespace loadkit::test
