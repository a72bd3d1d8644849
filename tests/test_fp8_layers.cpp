// fp8 checkpoints as they ship (tests/fixtures/archs/fp8.py, per_layer_and_per_tensor):
//  - per-layer quantization: layers the quantization_config leaves 16-bit (block fp8's
//    modules_to_not_convert, per-tensor fp8's ignored_layers, compressed-tensors' ignore with
//    names and re: patterns) load 16-bit, bytes as on disk; the rest fp8;
//  - per-tensor fp8 (quant_method fp8 without weight_block_size): vLLM's kernel format (fused
//    parts requantized to their largest scale, computed here independently), bad tensors exit 3;
//  - compressed-tensors experts, per channel and per tensor;
// and for each (logits against transformers on the dequantized weights: tests/archs/fp8_layers.cpp)
// reload fp8 -> fp8 equal to
// a fresh load in place, and quantize-on-sync (a trainer's bf16 tensors) equal to a fresh load of
// the same weights quantized offline by the fixture script's reference quantizer
// (tests/fixtures/fp8_quant.py), ignored layers synced as the 16-bit tensors they are.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <map>

#include "device_skip.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"
#include "tensor_io.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

/// A fixture, the 16-bit checkpoint its reload target was quantized from (what a trainer syncs),
/// and its layers the config leaves 16-bit (model names as vLLM's).
struct Case {
  std::string fixture;
  std::string target_source;  ///< bf16 source of fixture(fixture).reload_target, "" without one
  std::vector<std::string> unquantized;
};

const std::vector<std::string> kIgnored = {"model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_up_proj",
                                           "model.layers.1.mlp.down_proj"};

const std::vector<Case>& cases() {
  static const std::vector<Case> all = {
      {"llama_blockfp8_ignored", "llama_blockfp8_b_bf16src", kIgnored},
      {"llama_fp8_tensor", "llama_blockfp8_b_bf16src", kIgnored},
      {"llama_ct_fp8_ignored", "", kIgnored},
      {"qwen3_moe_ct_fp8_channel", "qwen3_moe_blockfp8_b_bf16src", {}},
      {"qwen3_moe_ct_fp8_tensor", "qwen3_moe_blockfp8_b_bf16src", {}},
  };
  return all;
}

const Case& case_of(const std::string& name) {
  for (const Case& c : cases())
    if (c.fixture == name) return c;
  throw std::runtime_error("no case " + name);
}

using Param = std::tuple<std::string /*fixture*/, std::string /*device*/>;

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  return std::get<0>(info.param) + "_" + std::get<1>(info.param);
}

std::vector<std::string> fixture_names(bool with_target) {
  std::vector<std::string> out;
  for (const Case& c : cases())
    if (!with_target || !c.target_source.empty()) out.push_back(c.fixture);
  return out;
}

bool is_fp8(const at::Tensor& t) { return t.scalar_type() == at::kFloat8_e4m3fn; }

class Fp8Checkpoint : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    device = std::get<1>(GetParam());
    SKIP_WITHOUT(device);
    c = &case_of(std::get<0>(GetParam()));
    f = &fixture(c->fixture);
    model = load_model(f->dir, device);
  }
  std::string device;
  const Case* c = nullptr;
  const Fixture* f = nullptr;
  std::unique_ptr<LoadedModel> model;
};

class Fp8CheckpointReload : public Fp8Checkpoint {};

TEST_P(Fp8Checkpoint, IgnoredLayersAre16BitAsOnDiskTheRestFp8) {
  auto state = kernel_state(*model);
  auto on_disk = read_checkpoint(f->dir);
  for (const std::string& layer : c->unquantized) {
    const at::Tensor& w = state.at(layer + ".weight");
    EXPECT_EQ(w.scalar_type(), at::kBFloat16) << layer;
    for (const char* scale : {".weight_scale", ".weight_scale_inv"}) EXPECT_FALSE(state.count(layer + scale)) << layer;
    // A single checkpoint tensor (o_proj, down_proj) is the layer's weight byte for byte.
    if (on_disk.count(layer + ".weight")) {
      EXPECT_TRUE(at::equal(w.cpu(), on_disk.at(layer + ".weight"))) << layer;
    }
  }
  // Every other linear layer is fp8, the router and the head are not.
  for (const char* layer : {"model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.o_proj",
                            "model.layers.1.self_attn.qkv_proj", "model.layers.0.mlp.down_proj"})
    EXPECT_TRUE(is_fp8(state.at(std::string(layer) + ".weight"))) << layer;
  if (c->fixture.starts_with("qwen3_moe")) {
    EXPECT_TRUE(is_fp8(state.at("model.layers.1.mlp.experts.w13_weight")));
    EXPECT_TRUE(is_fp8(state.at("model.layers.1.mlp.experts.w2_weight")));
    EXPECT_EQ(state.at("model.layers.1.mlp.gate.weight").scalar_type(), at::kBFloat16);
  }
  EXPECT_EQ(state.at("lm_head.weight").scalar_type(), at::kBFloat16);
}

TEST_P(Fp8CheckpointReload, ReloadFp8EqualsFreshLoadInPlace) {
  const Fixture& b = fixture(f->reload_target);
  const auto ptrs = parameter_addresses(*model);
  const auto fresh_a = kernel_state(*model);
  EXPECT_TRUE(model->reload(b.dir).pointers_stable);
  EXPECT_EQ(parameter_addresses(*model), ptrs);
  expect_identical(kernel_state(*model), kernel_state(*load_model(b.dir, device)));
  model->reload(f->dir);
  expect_identical(kernel_state(*model), fresh_a);
}

TEST_P(Fp8CheckpointReload, UpdateFromBf16TensorsQuantizesAsTheReference) {
  const Fixture& b = fixture(f->reload_target);
  const auto ptrs = parameter_addresses(*model);
  std::vector<NamedWeight> weights = loadkit::read_checkpoint(fixture(c->target_source).dir);
  for (auto& w : weights) w.tensor = w.tensor.to(device);
  model->begin_update();
  model->validate_update(weights, /*complete=*/true);
  const size_t half = weights.size() / 2;  // two chunks: a module's tensors may arrive in different ones
  model->update({weights.begin(), weights.begin() + half});
  model->update({weights.begin() + half, weights.end()});
  EXPECT_TRUE(model->finish_update().pointers_stable);
  EXPECT_EQ(parameter_addresses(*model), ptrs);
  const auto synced = kernel_state(*model);
  // b is the same bf16 weights quantized offline by tests/fixtures/fp8_quant.py.
  expect_identical(synced, kernel_state(*load_model(b.dir, device)));
  // Ignored layers stay 16-bit: the trainer's tensors themselves.
  auto source = read_checkpoint(fixture(c->target_source).dir);
  for (const std::string& layer : c->unquantized) {
    if (source.count(layer + ".weight")) {
      EXPECT_TRUE(at::equal(synced.at(layer + ".weight").cpu(), source.at(layer + ".weight"))) << layer;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Fp8Checkpoint,
                         ::testing::Combine(::testing::ValuesIn(fixture_names(false)), ::testing::Values("cpu", "cuda")),
                         param_name);
INSTANTIATE_TEST_SUITE_P(Fixtures, Fp8CheckpointReload,
                         ::testing::Combine(::testing::ValuesIn(fixture_names(true)), ::testing::Values("cpu", "cuda")),
                         param_name);

// ------------------------------------------------------------ per-tensor fp8: vLLM's kernel format

/// e4m3(float32(q) x s / max): a part requantized to the fused layer's largest scale (vLLM's
/// requantize_with_max_scale), written here from the checkpoint's tensors.
at::Tensor requantized(const at::Tensor& q, const at::Tensor& s, const at::Tensor& max) {
  return at::div(q.to(at::kFloat) * s.reshape({1}), max.reshape({1})).to(at::kFloat8_e4m3fn);
}

TEST(PerTensorFp8, FusedPartsAreRequantizedToTheirLargestScale) {
  const Fixture& f = fixture("llama_fp8_tensor");
  auto state = kernel_state(*load_model(f.dir));
  auto disk = read_checkpoint(f.dir);
  for (const auto& [fused, parts] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"model.layers.0.self_attn.qkv_proj", {"q_proj", "k_proj", "v_proj"}},
           {"model.layers.0.mlp.gate_up_proj", {"gate_proj", "up_proj"}},
           {"model.layers.1.self_attn.o_proj", {"o_proj"}}}) {
    const std::string base = fused.substr(0, fused.rfind('.') + 1);
    std::vector<at::Tensor> scales, qs;
    for (const std::string& part : parts) {
      qs.push_back(disk.at(base + part + ".weight"));
      scales.push_back(disk.at(base + part + ".weight_scale").reshape({1}));
      ASSERT_EQ(disk.at(base + part + ".weight_scale").dim(), 0) << "the fixture writes scalar scales";
    }
    const at::Tensor max = at::cat(scales).max().reshape({1});
    EXPECT_TRUE(at::equal(state.at(fused + ".weight_scale"), max)) << fused;
    std::vector<at::Tensor> expected;
    for (size_t i = 0; i < parts.size(); ++i)
      expected.push_back(parts.size() == 1 ? qs[i] : requantized(qs[i], scales[i], max));
    const at::Tensor weight = state.at(fused + ".weight");  // [K, N], as _scaled_mm takes it
    ASSERT_EQ(weight.sizes(), at::IntArrayRef({qs[0].size(1), at::cat(expected).size(0)})) << fused;
    EXPECT_TRUE(at::equal(weight.t().view(at::kByte), at::cat(expected).view(at::kByte))) << fused;
  }
}

constexpr const char* kQ = "model.layers.1.self_attn.q_proj.weight";
constexpr const char* kQScale = "model.layers.1.self_attn.q_proj.weight_scale";

struct BadTensor {
  std::string name, tensor;
  std::function<void(std::map<std::string, at::Tensor>&)> edit;
  std::vector<std::string> fragments;
};

void PrintTo(const BadTensor& bad, std::ostream* os) { *os << bad.name; }  // ctest shows the name, not bytes

class PerTensorFp8Bad : public ::testing::TestWithParam<BadTensor> {};

TEST_P(PerTensorFp8Bad, LoadIsExit3NamingFileAndTensorReloadLeavesTheModelUntouched) {
  const BadTensor& bad = GetParam();
  TempDir tmp;
  fs::path dir = edited_fixture(fixture("llama_fp8_tensor"), tmp / "bad", bad.tensor, bad.edit);
  auto r = run_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()});
  std::vector<std::string> fragments = bad.fragments;
  if (bad.name != "MissingScale") fragments.push_back(dir.string());
  expect_failure(r, 3, fragments);
  auto model = load_model(fixture("llama_fp8_tensor").dir);
  const auto before = kernel_state(*model);
  try {
    model->reload(dir.string());
    ADD_FAILURE() << "reload of " << bad.name << " succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input) << e.what();
    for (const auto& frag : bad.fragments) EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
  }
  expect_identical(kernel_state(*model), before);
}

INSTANTIATE_TEST_SUITE_P(
    Edits, PerTensorFp8Bad,
    ::testing::Values(
        BadTensor{"MissingScale", kQScale, [](auto& t) { t.erase(kQScale); }, {kQScale}},
        BadTensor{"ScaleOfWrongShape", kQScale, [](auto& t) { t[kQScale] = at::ones({2}); }, {kQScale, "[2]"}},
        BadTensor{"ScaleNotFloat32", kQScale, [](auto& t) { t[kQScale] = t[kQScale].to(at::kBFloat16); },
                  {kQScale, "float32"}},
        BadTensor{"WeightNotFp8", kQ, [](auto& t) { t[kQ] = t[kQ].to(at::kFloat).to(at::kBFloat16); },
                  {kQ, "float8_e4m3fn"}}),
    [](const ::testing::TestParamInfo<BadTensor>& info) { return info.param.name; });

// ------------------------------------------------------------ tensor parallel (Gloo)

class Fp8CheckpointTp : public ::testing::TestWithParam<std::string> {};

TEST_P(Fp8CheckpointTp, TwoRanksMatchOneAndTransformers) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  expect_two_ranks_match_one_and_transformers(fixture(GetParam()));
}

// Each rank holds its slice of every expert's intermediate rows, and of their per-channel scales;
// per-tensor scales (and w2's per-channel ones, over the hidden rows) are the same on every rank.
TEST_P(Fp8CheckpointTp, EachRanksExpertsAreItsSlice) {
  const Fixture& f = fixture(GetParam());
  if (!f.name.starts_with("qwen3_moe")) GTEST_SKIP() << f.name << " has no experts";
  auto whole = kernel_state(*load_model(f.dir));
  const std::string experts = "model.layers.1.mlp.experts.";
  for (int rank = 0; rank < 2; ++rank) {
    auto shard = kernel_state(*load_model(f.dir, "cpu", "auto", "auto", "auto", 2, rank));
    const at::Tensor& w13 = whole.at(experts + "w13_weight");  // [E, 2I, H]
    const int64_t inter = w13.size(1) / 2, half = inter / 2;
    auto rows = [&](const at::Tensor& t) {
      return at::cat({t.narrow(1, rank * half, half), t.narrow(1, inter + rank * half, half)}, 1);
    };
    EXPECT_TRUE(at::equal(shard.at(experts + "w13_weight").view(at::kByte), rows(w13).view(at::kByte)));
    EXPECT_TRUE(at::equal(shard.at(experts + "w2_weight").view(at::kByte),
                          whole.at(experts + "w2_weight").narrow(2, rank * half, half).view(at::kByte)));
    const at::Tensor& s13 = whole.at(experts + "w13_weight_scale");
    EXPECT_TRUE(at::equal(shard.at(experts + "w13_weight_scale"), s13.dim() == 3 ? rows(s13) : s13));
    EXPECT_TRUE(at::equal(shard.at(experts + "w2_weight_scale"), whole.at(experts + "w2_weight_scale")));
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Fp8CheckpointTp,
                         ::testing::Values("llama_fp8_tensor", "qwen3_moe_ct_fp8_channel", "qwen3_moe_ct_fp8_tensor"));

// ------------------------------------------------------------ configs naming layers

/// A copy of `fixture_name` whose quantization_config gets `edit`; the CLI's load of it.
CliResult load_with_config(const TempDir& tmp, const std::string& fixture_name,
                           const std::function<void(nlohmann::json&)>& edit, fs::path* dir_out = nullptr) {
  fs::path dir = copy_fixture(fixture(fixture_name), tmp / "edited");
  nlohmann::json cfg = nlohmann::json::parse(read_bytes(dir / "config.json"));
  edit(cfg["quantization_config"]);
  write_bytes(dir / "config.json", cfg.dump(2));
  if (dir_out) *dir_out = dir;
  return run_cli({"load", "--model", dir.string(), "--plugin-dir", plugin_dir()});
}

TEST(Fp8LayerConfig, FusedLayerWithSomePartsIgnoredIsExit3NamingIt) {
  TempDir tmp;
  fs::path dir;
  auto r = load_with_config(tmp, "llama_blockfp8_ignored", [](nlohmann::json& q) {
    q["modules_to_not_convert"].push_back("model.layers.1.self_attn.k_proj");
  }, &dir);
  expect_failure(r, 3, {(dir / "config.json").string(), "model.layers.1.self_attn.k_proj",
                        "model.layers.1.self_attn.qkv_proj"});
}

TEST(Fp8LayerConfig, CompressedTensorsPatternWithSomePartsIsExit3NamingIt) {
  TempDir tmp;
  fs::path dir;
  auto r = load_with_config(tmp, "llama_ct_fp8_ignored", [](nlohmann::json& q) {
    q["ignore"].push_back("re:.*layers\\.0\\.mlp\\.up_proj$");
  }, &dir);
  expect_failure(r, 3, {(dir / "config.json").string(), "model.layers.0.mlp.gate_up_proj"});
}

TEST(Fp8LayerConfig, UnreadablePatternIsExit3NamingIt) {
  TempDir tmp;
  auto r = load_with_config(tmp, "llama_ct_fp8_ignored", [](nlohmann::json& q) { q["ignore"].push_back("re:(unclosed"); });
  expect_failure(r, 3, {"quantization_config.ignore", "re:(unclosed"});
}

TEST(Fp8LayerConfig, StaticActivationScalesArePluginErrorsNamingTheKey) {
  TempDir tmp;
  auto r = load_with_config(tmp, "llama_fp8_tensor", [](nlohmann::json& q) { q["activation_scheme"] = "static"; });
  expect_failure(r, 4, {"quantization_config.activation_scheme", "static"});
}

// Ignoring every expert projection of a layer (vLLM: an ignore entry naming experts that contains
// the FusedMoE layer's name) leaves that layer's experts 16-bit; the checkpoint must then hold them so.
TEST(Fp8LayerConfig, ExpertsNamedInIgnoredLayersLoad16Bit) {
  TempDir tmp;
  fs::path dir;
  // qwen3_moe_ct_fp8_channel's experts are fp8 on disk: a config that ignores them asks for 16 bits.
  auto r = load_with_config(tmp, "qwen3_moe_ct_fp8_channel", [](nlohmann::json& q) {
    q["ignore"].push_back("re:model\\.layers\\.1\\.mlp\\.experts\\.");
  }, &dir);
  // The experts' parameters are 16-bit now, so the checkpoint's fp8 expert tensors do not fit them.
  EXPECT_EQ(r.code, 3) << r.err;
  EXPECT_NE(r.err.find("model.layers.1.mlp.experts."), std::string::npos) << r.err;
}

}  // namespace
}  // namespace loadkit::test
