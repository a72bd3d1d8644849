// Pre-quantized block-fp8 checkpoints (plugins/quant/block_fp8.cpp) beyond their logits
// (tests/archs/block_fp8.cpp):
//  - reload fp8 -> fp8 writes straight into the kernel tensors: bit for bit a fresh load, same storage;
//  - quantize-on-sync: 16-bit weights (reload from a bf16 directory, update() from tensors) into a
//    model loaded from block fp8 equal, bit for bit, a fresh load of the same weights quantized
//    offline by the fixture script's independent reference quantizer (tests/fixtures/fp8_quant.py);
//  - `quantization auto` and its conflicts; bad inputs, each one line naming the file and the
//    tensor or key, the right exit code, the model untouched on reload.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <map>

#include "device_skip.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

using Param = std::tuple<std::string /*fixture*/, std::string /*device*/>;

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param);
}

/// The 16-bit checkpoint the fixture `f` was quantized from.
const Fixture& bf16_source(const Fixture& f) { return fixture(f.name + "_bf16src"); }

/// A model loaded from fixture a (block fp8) on the parameter's device, its reload target b, and
/// the addresses of its parameters (a reload or update must keep them).
class BlockFp8 : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    device = std::get<1>(GetParam());
    SKIP_WITHOUT(device);
    a = &fixture(std::get<0>(GetParam()));
    b = &fixture(a->reload_target);
    model = load_model(a->dir, device);
    ptrs = parameter_addresses(*model);
  }
  void expect_same_storage() { EXPECT_EQ(parameter_addresses(*model), ptrs); }

  std::string device;
  const Fixture* a = nullptr;
  const Fixture* b = nullptr;
  std::unique_ptr<LoadedModel> model;
  std::map<std::string, const void*> ptrs;
};

TEST_P(BlockFp8, LoadsInVllmLayout) {
  EXPECT_EQ(model->report().quantization, "fp8");
  auto state = kernel_state(*model);
  // q (256) + k (64, half a block) + v (64): each part its own blocks -> 2 + 1 + 1 scale rows.
  const auto& qkv = state.at("model.layers.0.self_attn.qkv_proj.weight");
  EXPECT_EQ(qkv.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(qkv.sizes(), at::IntArrayRef({384, 256}));
  EXPECT_EQ(state.at("model.layers.0.self_attn.qkv_proj.weight_scale_inv").sizes(), at::IntArrayRef({4, 2}));
  EXPECT_EQ(state.at("model.layers.0.self_attn.qkv_proj.weight_scale_inv").scalar_type(), at::kFloat);
  if (a->name.starts_with("qwen3_moe")) {
    // Experts of 192: gate and up each 2 blocks of rows (one partial), down 2 blocks of columns.
    EXPECT_EQ(state.at("model.layers.1.mlp.experts.w13_weight").scalar_type(), at::kFloat8_e4m3fn);
    EXPECT_EQ(state.at("model.layers.1.mlp.experts.w13_weight_scale_inv").sizes(), at::IntArrayRef({4, 4, 2}));
    EXPECT_EQ(state.at("model.layers.1.mlp.experts.w2_weight_scale_inv").sizes(), at::IntArrayRef({4, 2, 2}));
    // The router stays 16-bit.
    EXPECT_EQ(state.at("model.layers.1.mlp.gate.weight").scalar_type(), at::kBFloat16);
  } else {
    EXPECT_EQ(state.at("model.layers.0.mlp.down_proj.weight_scale_inv").sizes(), at::IntArrayRef({2, 3}));
  }
  EXPECT_EQ(state.at("lm_head.weight").scalar_type(), at::kBFloat16);
}

TEST_P(BlockFp8, ReloadFp8EqualsFreshLoadInPlace) {
  const auto fresh_a = kernel_state(*model);
  EXPECT_TRUE(model->reload(b->dir).pointers_stable);
  expect_same_storage();
  auto fresh_b = load_model(b->dir, device);
  expect_identical(kernel_state(*model), kernel_state(*fresh_b));
  EXPECT_TRUE(at::equal(model->logits(b->tokens), fresh_b->logits(b->tokens)));
  model->reload(a->dir);
  expect_identical(kernel_state(*model), fresh_a);
}

TEST_P(BlockFp8, ReloadFromBf16QuantizesAsTheReference) {
  EXPECT_TRUE(model->reload(bf16_source(*b).dir).pointers_stable);
  expect_same_storage();
  // b is bf16_source(b) quantized offline by tests/fixtures/fp8_quant.py.
  expect_identical(kernel_state(*model), kernel_state(*load_model(b->dir, device)));
}

TEST_P(BlockFp8, UpdateFromBf16TensorsQuantizesAsTheReference) {
  std::vector<NamedWeight> weights = loadkit::read_checkpoint(bf16_source(*b).dir);
  for (auto& w : weights) w.tensor = w.tensor.to(device);
  model->begin_update();
  model->validate_update(weights, /*complete=*/true);
  // Two chunks: a module's tensors may arrive in different ones.
  const size_t half = weights.size() / 2;
  model->update({weights.begin(), weights.begin() + half});
  model->update({weights.begin() + half, weights.end()});
  const LoadReport& report = model->finish_update();
  EXPECT_TRUE(report.pointers_stable);
  expect_same_storage();
  if (device == "cuda") {
    // The trainer's tensors are on the device already: what the sync adds is its quantization
    // scratch (an fp8 copy of one tensor, per-block scales), within the largest layer + 5 %.
    uint64_t largest = 0;
    for (auto& [name, module] : model->model().named_modules()) {
      uint64_t bytes = 0;
      for (auto& [pname, p] : module->parameters()) bytes += p->data.nbytes();
      largest = std::max(largest, bytes);
    }
    ASSERT_TRUE(report.peak_extra_device_bytes.has_value());
    EXPECT_LE(*report.peak_extra_device_bytes, largest + largest / 20) << "largest layer " << largest << " bytes";
  }
  expect_identical(kernel_state(*model), kernel_state(*load_model(b->dir, device)));
}

INSTANTIATE_TEST_SUITE_P(Fixtures, BlockFp8,
                         ::testing::Combine(::testing::Values("llama_blockfp8", "qwen3_moe_blockfp8"),
                                            ::testing::Values("cpu", "cuda")),
                         param_name);

// ------------------------------------------------------------ quantization auto

TEST(BlockFp8Auto, SixteenBitCheckpointLoadsUnquantized) {
  auto model = load_model(fixture("llama_blockfp8_bf16src").dir);
  EXPECT_EQ(model->report().quantization, "none");
  EXPECT_EQ(kernel_state(*model).at("model.layers.0.self_attn.qkv_proj.weight").scalar_type(), at::kBFloat16);
}

TEST(BlockFp8Auto, ExplicitFp8OnAnFp8CheckpointIsItsOwnMethod) {
  auto model = load_model(fixture("llama_blockfp8").dir, "cpu", "fp8");
  expect_identical(kernel_state(*model), kernel_state(*load_model(fixture("llama_blockfp8").dir)));
}

class BlockFp8Cli : public ::testing::Test {
 protected:
  CliResult logits(const fs::path& dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"logits", "--model", dir.string(), "--tokens", "1,2,3",
                                     "--out", (tmp / "logits.safetensors").string(), "--plugin-dir", plugin_dir()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_cli(args);
  }
  /// A copy of llama_blockfp8 whose config.json's quantization_config gets `edit`.
  fs::path with_quant_config(const std::function<void(nlohmann::json&)>& edit) {
    fs::path dir = copy_fixture(fixture("llama_blockfp8"), tmp / "edited");
    nlohmann::json cfg = nlohmann::json::parse(read_bytes(dir / "config.json"));
    edit(cfg["quantization_config"]);
    write_bytes(dir / "config.json", cfg.dump(2));
    return dir;
  }
  TempDir tmp;
};

TEST_F(BlockFp8Cli, AutoIsTheDefault) {
  auto r = logits(fixture("llama_blockfp8").dir);
  ASSERT_EQ(r.code, 0) << r.err;
}

TEST_F(BlockFp8Cli, AnotherMethodOnAPreQuantizedCheckpointIsUsage) {
  const std::string config = (fs::path(fixture("llama_blockfp8").dir) / "config.json").string();
  for (const char* asked : {"int8", "none"})
    expect_failure(logits(fixture("llama_blockfp8").dir, {"--quantization", asked}), 2,
                   {asked, config, "already quantized", "'fp8'"});
}

TEST_F(BlockFp8Cli, UnknownQuantMethodIsPlugin) {
  auto dir = with_quant_config([](nlohmann::json& q) { q["quant_method"] = "awq"; });
  expect_failure(logits(dir), 4, {"awq"});
}

TEST_F(BlockFp8Cli, WeightBlockSizeMustBeTwoPositiveIntegers) {
  for (const auto& bad : {nlohmann::json::array({128}), nlohmann::json::array({0, 128}),
                          nlohmann::json::array({128, -128}), nlohmann::json::array({128, 128, 128})}) {
    auto dir = with_quant_config([&](nlohmann::json& q) { q["weight_block_size"] = bad; });
    expect_failure(logits(dir), 3, {(dir / "config.json").string(), "quantization_config.weight_block_size",
                                    "two positive integers"});
    fs::remove_all(dir);
  }
  auto dir = with_quant_config([](nlohmann::json& q) { q["weight_block_size"] = "128x128"; });
  expect_failure(logits(dir), 3, {(dir / "config.json").string(), "quantization_config.weight_block_size"});
}

// A job without a quantization key loads an fp8 checkpoint with its own method (auto), and its reload
// from a bf16 directory quantizes on arrival: the logits are a fresh load's of the offline quantization.
TEST_F(BlockFp8Cli, JobDefaultsToAutoAndSyncsFromBf16) {
  const Fixture& a = fixture("llama_blockfp8");
  const Fixture& b = fixture(a.reload_target);
  const fs::path job = tmp / "job.yaml";
  write_bytes(job, "name: fp8-sync\n"
                   "model:\n  path: " + a.dir + "\n  device: cpu\n"
                   "steps:\n  - load\n"
                   "  - reload:\n      from: " + bf16_source(b).dir + "\n"
                   "  - logits:\n      tokens_from: " + b.reference + "\n      out: " + (tmp / "l.safetensors").string() + "\n");
  auto r = run_cli({"run", job.string(), "--log-level", "warn"}, {{"LOADKIT_PLUGINS", plugin_dir()}});
  ASSERT_EQ(r.code, 0) << r.err;
  at::Tensor job_logits;
  for (auto& [name, t] : load_tensors((tmp / "l.safetensors").string()))
    if (name == "logits") job_logits = t;
  ASSERT_TRUE(job_logits.defined());
  EXPECT_TRUE(at::equal(job_logits, load_model(b.dir)->logits(b.tokens)));
}

// ------------------------------------------------------------ bad checkpoints

constexpr const char* kQ = "model.layers.1.self_attn.q_proj.weight";
constexpr const char* kQScale = "model.layers.1.self_attn.q_proj.weight_scale_inv";

/// A copy of llama_blockfp8 with the file holding `tensor` rewritten by `edit`.
fs::path edited_checkpoint(const fs::path& dest, const std::string& tensor,
                           const std::function<void(std::map<std::string, at::Tensor>&)>& edit) {
  return edited_fixture(fixture("llama_blockfp8"), dest, tensor, edit);
}

struct BadCheckpoint {
  std::string name;
  std::string tensor;  ///< the tensor edited
  std::function<void(std::map<std::string, at::Tensor>&)> edit;
  /// What the one error line names besides the directory, on a load and on a reload alike (both
  /// name a missing tensor as the checkpoint does: loadkit/missing_tensors.h).
  std::vector<std::string> fragments;
};

std::vector<BadCheckpoint> bad_checkpoints() {
  return {
      {"MissingScale", kQScale, [](auto& t) { t.erase(kQScale); }, {kQScale}},
      {"ScaleOfWrongShape", kQScale, [](auto& t) { t[kQScale] = at::ones({3, 2}); }, {kQScale, "[3, 2]"}},
      {"ScaleNotFloat32", kQScale, [](auto& t) { t[kQScale] = t[kQScale].to(at::kBFloat16); }, {kQScale, "float32"}},
      {"WeightNotFp8", kQ, [](auto& t) { t[kQ] = t[kQ].to(at::kFloat).to(at::kBFloat16); }, {kQ, "float8_e4m3fn"}},
  };
}

void PrintTo(const BadCheckpoint& bad, std::ostream* os) { *os << bad.name; }  // ctest shows the name, not bytes

class BlockFp8BadCheckpoint : public ::testing::TestWithParam<BadCheckpoint> {};

TEST_P(BlockFp8BadCheckpoint, FreshLoadIsExit3NamingTheTensor) {
  const auto& bad = GetParam();
  TempDir tmp;
  fs::path dir = edited_checkpoint(tmp / "bad", bad.tensor, bad.edit);
  auto r = run_cli({"logits", "--model", dir.string(), "--tokens", "1,2", "--out", (tmp / "l.safetensors").string(),
                    "--plugin-dir", plugin_dir()});
  std::vector<std::string> fragments = bad.fragments;
  // A tensor's error names its file; the missing-weights check (auto_weights_loader.h) names tensors only.
  if (bad.name != "MissingScale") fragments.push_back(dir.string());
  expect_failure(r, 3, fragments);
}

TEST_P(BlockFp8BadCheckpoint, ReloadIsInputErrorAndLeavesTheModelUntouched) {
  const auto& bad = GetParam();
  TempDir tmp;
  fs::path dir = edited_checkpoint(tmp / "bad", bad.tensor, bad.edit);
  auto model = load_model(fixture("llama_blockfp8").dir);
  const auto before = kernel_state(*model);
  try {
    model->reload(dir.string());
    FAIL() << "reload of " << bad.name << " succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input) << e.what();
    const std::string what = e.what();
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
    for (const auto& f : bad.fragments)
      EXPECT_NE(what.find(f), std::string::npos) << f << " not in: " << what;
  }
  expect_identical(kernel_state(*model), before);
}

TEST(CompressedTensors, PerTensorScalesAreOnePerFusedPart) {
  auto state = kernel_state(*load_model(fixture("llama_ct_fp8_tensor").dir));
  EXPECT_EQ(state.at("model.layers.0.self_attn.qkv_proj.weight_scale").sizes(), at::IntArrayRef({3}));
  EXPECT_EQ(state.at("model.layers.0.mlp.gate_up_proj.weight_scale").sizes(), at::IntArrayRef({2}));
  EXPECT_EQ(state.at("model.layers.0.mlp.down_proj.weight_scale").sizes(), at::IntArrayRef({1}));
}

TEST(CompressedTensors, OtherSchemesArePluginErrorsNamingThem) {
  TempDir tmp;
  fs::path dir = copy_fixture(fixture("llama_ct_fp8_channel"), tmp / "w4a16");
  nlohmann::json cfg = nlohmann::json::parse(read_bytes(dir / "config.json"));
  cfg["quantization_config"]["config_groups"]["group_0"]["weights"] =
      {{"num_bits", 4}, {"type", "int"}, {"strategy", "group"}, {"group_size", 128}, {"symmetric", true}, {"dynamic", false}};
  write_bytes(dir / "config.json", cfg.dump(2));
  auto r = run_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()});
  expect_failure(r, 4, {(dir / "config.json").string(), "quantization_config.config_groups.group_0.weights",
                        "4-bit int, strategy group"});
}

TEST(CompressedTensors, MissingWeightScaleIsExit3NamingIt) {
  TempDir tmp;
  const std::string scale = "model.layers.1.mlp.down_proj.weight_scale";
  fs::path dir = copy_fixture(fixture("llama_ct_fp8_channel"), tmp / "bad");
  const fs::path file = file_holding(dir, scale);
  std::vector<std::pair<std::string, at::Tensor>> kept;
  for (auto& [name, t] : load_tensors(file.string()))
    if (name != scale) kept.emplace_back(name, t.clone());
  fs::remove(file);
  save_tensors(file.string(), kept);
  nlohmann::json index = nlohmann::json::parse(read_bytes(dir / "model.safetensors.index.json"));
  index["weight_map"].erase(scale);
  write_bytes(dir / "model.safetensors.index.json", index.dump(2));
  auto r = run_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()});
  expect_failure(r, 3, {scale});
}

INSTANTIATE_TEST_SUITE_P(Edits, BlockFp8BadCheckpoint, ::testing::ValuesIn(bad_checkpoints()),
                         [](const ::testing::TestParamInfo<BadCheckpoint>& info) { return info.param.name; });

// ------------------------------------------------------------ tensor parallel (Gloo) and sharded state

class BlockFp8Tp : public ::testing::TestWithParam<std::string> {};

// Scales shard with their weights: column parallel (q split by heads, the one kv head replicated),
// merged gate/up, row parallel (o, down: input columns in whole blocks), experts.
TEST_P(BlockFp8Tp, TwoRanksMatchOneAndTransformers) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  expect_two_ranks_match_one_and_transformers(fixture(GetParam()));
}

// Each rank's scales are the rows/columns of the whole checkpoint's scales its weight slice covers.
TEST_P(BlockFp8Tp, EachRanksScalesAreItsBlocks) {
  const Fixture& f = fixture(GetParam());
  auto whole = kernel_state(*load_model(f.dir));
  for (int rank = 0; rank < 2; ++rank) {
    auto shard = kernel_state(*load_model(f.dir, "cpu", "auto", "auto", "auto", 2, rank));
    // gate_up [2 x 256 rows a rank] -> 2 + 2 block rows, this rank's half of each part.
    const at::Tensor& s1 = whole.at("model.layers.0.mlp.gate_up_proj.weight_scale_inv");
    const at::Tensor& sr = shard.at("model.layers.0.mlp.gate_up_proj.weight_scale_inv");
    const int64_t part = s1.size(0) / 2, half = part / 2;
    EXPECT_TRUE(at::equal(sr, at::cat({s1.narrow(0, rank * half, half), s1.narrow(0, part + rank * half, half)})));
    // down [H, 512] -> this rank's 2 of 4 block columns.
    const at::Tensor& d1 = whole.at("model.layers.0.mlp.down_proj.weight_scale_inv");
    EXPECT_TRUE(at::equal(shard.at("model.layers.0.mlp.down_proj.weight_scale_inv"), d1.narrow(1, rank * 2, 2)));
    if (whole.count("model.layers.1.mlp.experts.w13_weight_scale_inv")) {
      // Experts of 256 (2 blocks), 128 a rank: w13 gate block `rank` and up block 2 + rank; w2 column `rank`.
      const at::Tensor& w13 = whole.at("model.layers.1.mlp.experts.w13_weight_scale_inv");
      EXPECT_TRUE(at::equal(shard.at("model.layers.1.mlp.experts.w13_weight_scale_inv"),
                            at::cat({w13.narrow(1, rank, 1), w13.narrow(1, 2 + rank, 1)}, 1)));
      EXPECT_TRUE(at::equal(shard.at("model.layers.1.mlp.experts.w2_weight_scale_inv"),
                            whole.at("model.layers.1.mlp.experts.w2_weight_scale_inv").narrow(2, rank, 1)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, BlockFp8Tp, ::testing::Values("llama_blockfp8_tp", "qwen3_moe_blockfp8_tp"));

// compressed-tensors per channel: each rank's scales are its weight rows' (column parallel), every
// row on every rank (row parallel: o_proj, down_proj), the logits those of one rank.
TEST(CompressedTensorsTp, TwoRanksMatchOneAndTransformers) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("llama_ct_fp8_channel_tp");
  expect_two_ranks_match_one_and_transformers(f);
  auto whole = kernel_state(*load_model(f.dir));
  auto rank1 = kernel_state(*load_model(f.dir, "cpu", "auto", "auto", "auto", 2, 1));
  const at::Tensor& gate_up = whole.at("model.layers.0.mlp.gate_up_proj.weight_scale");  // [2 x 512, 1]
  EXPECT_TRUE(at::equal(rank1.at("model.layers.0.mlp.gate_up_proj.weight_scale"),
                        at::cat({gate_up.narrow(0, 256, 256), gate_up.narrow(0, 768, 256)})));
  EXPECT_TRUE(at::equal(rank1.at("model.layers.0.mlp.down_proj.weight_scale"),
                        whole.at("model.layers.0.mlp.down_proj.weight_scale")));
}

TEST(BlockFp8TpRefusal, SizeThatCutsABlockIsUsageNamingTheLayer) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  TempDir tmp;
  // Intermediate 384: gate/up rows and down_proj's input are 192 a rank, a block and a half.
  // Whichever scale arrives first names its layer.
  auto r = run_cli({"logits", "--model", fixture("llama_blockfp8").dir, "--tokens", "1,2", "--out",
                    (tmp / "l.safetensors").string(), "--tp-size", "2", "--plugin-dir", plugin_dir()});
  expect_failure(r, 2, {"-> parameter 'model.layers.", "mlp.", "_proj.weight_scale_inv'", "tensor parallel size 2",
                        "cuts a 128-element quantization block", "192 per rank"});
}

TEST(BlockFp8ShardedState, SaveShardedRoundTripsWeightsAndScales) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture("qwen3_moe_blockfp8_tp");
  TempDir tmp;
  auto saved = run_cli({"save-sharded", "--model", f.dir, "--out", (tmp / "s").string(), "--tp-size", "2",
                        "--plugin-dir", plugin_dir(), "--log-level", "warn"});
  ASSERT_EQ(saved.code, 0) << saved.err;
  for (int rank = 0; rank < 2; ++rank) {
    auto fresh = kernel_state(*load_model(f.dir, "cpu", "auto", "auto", "auto", 2, rank));
    auto sharded = kernel_state(*load_model((tmp / "s").string(), "cpu", "auto", "auto", "sharded", 2, rank));
    EXPECT_EQ(sharded.at("model.layers.1.mlp.experts.w13_weight").scalar_type(), at::kFloat8_e4m3fn);
    expect_identical(sharded, fresh);
  }
  at::Tensor hf = fixture_cli_logits(f, tmp / "hf.safetensors", {"--tp-size", "2"});
  Fixture s = f;
  s.dir = (tmp / "s").string();
  at::Tensor sh = fixture_cli_logits(s, tmp / "sh.safetensors", {"--tp-size", "2", "--load-format", "sharded"});
  ASSERT_TRUE(hf.defined() && sh.defined());
  EXPECT_TRUE(at::equal(hf, sh));
}

}  // namespace
}  // namespace loadkit::test
