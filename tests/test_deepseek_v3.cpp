// DeepSeek-V3 (plugins/deepseek_v2) beyond its logits (tests/archs/deepseek_v3.cpp):
//  - noaux_tc routing (select_experts) against a reference written here with plain loops;
//  - multi-token-prediction layers in the checkpoint: skipped at load and reload, one info line
//    (logged by the host at its log level),
//    and unknown tensors (exit 3) once the config no longer declares them;
//  - e_score_correction_bias: float32 under the router, a missing one exit 3 naming it (model
//    untouched on reload); config sizes: exit 3 naming the key;
//  - the block-fp8 checkpoint DeepSeek-V3 ships as: its layout, reload fp8 -> fp8 bit for bit a
//    fresh load in place, and quantize-on-sync (reload from the 16-bit checkpoint) bit for bit a fresh
//    load of the checkpoint quantized offline by tests/fixtures/fp8_quant.py.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>

#include "device_skip.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/layers/fused_moe.h"
#include "loadkit/module.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/tensor_files.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr const char* kFixture = "deepseek_v3_fp32_qlora";  // 3 layers (0 dense), MTP layer 3
constexpr const char* kBias = "model.layers.1.mlp.gate.e_score_correction_bias";

// ------------------------------------------------------------ routing

/// transformers' DeepseekV3TopkRouter, one token at a time with plain loops: sigmoid scores, the bias
/// added to choose, groups ranked by the sum of their two best biased scores, the top_k biased
/// scores of the best topk_group groups chosen, weighted by their unbiased scores.
std::vector<std::pair<int64_t, float>> reference_route(const std::vector<float>& logits, const std::vector<float>& bias,
                                                       const FusedMoEOptions& o) {
  const int64_t experts = o.num_experts, per_group = experts / o.num_expert_group;
  std::vector<float> score(experts), choice(experts);
  for (int64_t e = 0; e < experts; ++e) {
    score[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    choice[e] = score[e] + bias[e];
  }
  std::vector<std::pair<float, int64_t>> groups;
  for (int64_t g = 0; g < o.num_expert_group; ++g) {
    std::vector<float> members(choice.begin() + g * per_group, choice.begin() + (g + 1) * per_group);
    std::sort(members.rbegin(), members.rend());
    groups.push_back({members[0] + members[1], g});
  }
  std::sort(groups.rbegin(), groups.rend());
  std::vector<std::pair<float, int64_t>> candidates;
  for (int64_t i = 0; i < o.topk_group; ++i)
    for (int64_t e = groups[i].second * per_group; e < (groups[i].second + 1) * per_group; ++e)
      candidates.push_back({choice[e], e});
  std::sort(candidates.rbegin(), candidates.rend());
  std::vector<std::pair<int64_t, float>> out;
  float sum = 0;
  for (int64_t k = 0; k < o.top_k; ++k) {
    out.push_back({candidates[k].second, score[candidates[k].second]});
    sum += score[candidates[k].second];
  }
  for (auto& [e, w] : out) w = (o.renormalize ? w / sum : w) * static_cast<float>(o.routed_scaling_factor);
  std::sort(out.begin(), out.end());
  return out;
}

class NoauxTcRouting : public ::testing::TestWithParam<bool /*renormalize*/> {};

TEST_P(NoauxTcRouting, SelectExpertsMatchesTheLoopReference) {
  const FusedMoEOptions o{.num_experts = 8, .top_k = 3, .scoring = MoEScoring::Sigmoid, .renormalize = GetParam(),
                          .num_expert_group = 4, .topk_group = 2, .score_correction_bias = true,
                          .routed_scaling_factor = 2.5};
  const int64_t n = 200;
  at::manual_seed(3);
  at::Tensor logits = at::randn({n, o.num_experts}), bias = 0.2 * at::randn({o.num_experts});
  auto [weights, ids] = select_experts(logits, o, bias);
  ASSERT_EQ(weights.scalar_type(), at::kFloat);
  const std::vector<float> b(bias.data_ptr<float>(), bias.data_ptr<float>() + o.num_experts);
  int64_t changed_by_bias = 0;
  const std::vector<float> no_bias(o.num_experts, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<float> row(logits[t].data_ptr<float>(), logits[t].data_ptr<float>() + o.num_experts);
    std::vector<std::pair<int64_t, float>> got;
    for (int64_t k = 0; k < o.top_k; ++k) got.push_back({ids[t][k].item<int64_t>(), weights[t][k].item<float>()});
    std::sort(got.begin(), got.end());
    const auto want = reference_route(row, b, o);
    for (int64_t k = 0; k < o.top_k; ++k) {
      EXPECT_EQ(got[k].first, want[k].first) << "token " << t;
      EXPECT_NEAR(got[k].second, want[k].second, 1e-6) << "token " << t;
    }
    auto unbiased = reference_route(row, no_bias, o);
    changed_by_bias += !std::equal(want.begin(), want.end(), unbiased.begin(),
                                   [](const auto& x, const auto& y) { return x.first == y.first; });
  }
  // The bias must matter here, or the test could not tell choosing by it from ignoring it.
  EXPECT_GT(changed_by_bias, n / 10);
}

INSTANTIATE_TEST_SUITE_P(Renormalize, NoauxTcRouting, ::testing::Bool());

TEST(NoauxTcRouting, BiasIsRequiredExactlyWhenTheOptionsSaySo) {
  const FusedMoEOptions o{.num_experts = 4, .top_k = 2, .scoring = MoEScoring::Sigmoid, .num_expert_group = 2,
                          .topk_group = 1, .score_correction_bias = true};
  EXPECT_THROW(select_experts(at::randn({2, 4}), o), Error);
  FusedMoEOptions softmax = o;
  softmax.score_correction_bias = false;
  EXPECT_THROW(select_experts(at::randn({2, 4}), softmax, at::zeros({4})), Error);
}

// ------------------------------------------------------------ MTP layers and the correction bias

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

CliResult cli_logits(const Fixture& f, const fs::path& dir, const fs::path& out, std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"logits", "--model", dir.string(), "--tokens", f.tokens_arg(), "--out", out.string(),
                                "--plugin-dir", plugin_dir()};
  args.insert(args.end(), extra.begin(), extra.end());
  return run_cli(args);
}

void edit_config(const fs::path& dir, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json cfg = nlohmann::json::parse(read_bytes(dir / "config.json"));
  edit(cfg);
  write_bytes(dir / "config.json", cfg.dump(2));
}

TEST(DeepseekV3Mtp, LayersAreSkippedWithOneInfoLine) {
  const Fixture& f = fixture(kFixture);
  // The fixture's checkpoint does hold the MTP layer (model.layers.3 of a 3-layer model).
  ASSERT_NO_THROW(file_holding(f.dir, "model.layers.3.eh_proj.weight"));
  TempDir tmp;
  const CliResult r = cli_logits(f, f.dir, tmp / "l.safetensors");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(count(r.err, "multi-token-prediction"), 1u) << r.err;
  EXPECT_NE(r.err.find("model.layers.3.*"), std::string::npos) << r.err;
  auto model = load_model(f.dir);
  for (auto& [name, p] : model->model().named_parameters()) EXPECT_FALSE(name.starts_with("model.layers.3.")) << name;
  // A reload reads the MTP tensors of the target too, and skips them.
  EXPECT_NO_THROW(model->reload(f.dir));
}

TEST(DeepseekV3Mtp, TwoRanksPrintTheInfoLineOnce) {
  SKIP_WITHOUT_TP_BACKEND("cpu");
  const Fixture& f = fixture(kFixture);
  TempDir tmp;
  const CliResult r = cli_logits(f, f.dir, tmp / "l.safetensors", {"--tp-size", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(count(r.err, "multi-token-prediction"), 1u) << r.err;
}

// The line is logged by the host at its log level (loadkit/notes.h), not printed by the plugin.
TEST(DeepseekV3Mtp, InfoLineFollowsTheLogLevel) {
  const Fixture& f = fixture(kFixture);
  TempDir tmp;
  const CliResult quiet = cli_logits(f, f.dir, tmp / "q.safetensors", {"--log-level", "warn"});
  ASSERT_EQ(quiet.code, 0) << quiet.err;
  EXPECT_EQ(count(quiet.err, "multi-token-prediction"), 0u) << quiet.err;
  const CliResult info = cli_logits(f, f.dir, tmp / "i.safetensors", {"--log-level", "info"});
  ASSERT_EQ(info.code, 0) << info.err;
  EXPECT_EQ(count(info.err, "multi-token-prediction"), 1u) << info.err;
  EXPECT_NE(info.err.find("[info]"), std::string::npos) << info.err;
}

// The skip follows num_nextn_predict_layers: without it the same tensors are a checkpoint the model does not fit.
TEST(DeepseekV3Mtp, UndeclaredLayersAreUnknownTensors) {
  const Fixture& f = fixture(kFixture);
  TempDir tmp;
  const fs::path dir = copy_fixture(f, tmp / "m");
  edit_config(dir, [](nlohmann::json& c) { c["num_nextn_predict_layers"] = 0; });
  const CliResult r = cli_logits(f, dir, tmp / "l.safetensors");
  expect_failure(r, 3, {"model.layers.3"});
  EXPECT_EQ(count(r.err, "multi-token-prediction"), 0u) << r.err;
}

/// A copy of fixture `name` without kBias (its file rewritten, the index no longer naming it).
fs::path without_bias(const std::string& name, const fs::path& dest) {
  const fs::path dir = copy_fixture(fixture(name), dest);
  const fs::path file = file_holding(dir, kBias);
  std::vector<std::pair<std::string, at::Tensor>> kept;
  for (auto& [tensor, t] : load_tensors(file.string()))
    if (tensor != kBias) kept.push_back({tensor, t.clone()});
  fs::remove(file);
  save_tensors(file.string(), kept);
  if (fs::exists(dir / "model.safetensors.index.json")) {
    nlohmann::json index = nlohmann::json::parse(read_bytes(dir / "model.safetensors.index.json"));
    index["weight_map"].erase(kBias);
    write_bytes(dir / "model.safetensors.index.json", index.dump(2));
  }
  return dir;
}

TEST(DeepseekV3Bias, IsFloat32UnderTheRouterWithTheCheckpointsValues) {
  const Fixture& f = fixture("deepseek_v3_bf16_qlora");
  auto state = kernel_state(*load_model(f.dir));
  const at::Tensor& bias = state.at(kBias);
  EXPECT_EQ(bias.scalar_type(), at::kFloat);
  for (auto& [name, t] : load_tensors(file_holding(f.dir, kBias).string()))
    if (name == kBias) {
      EXPECT_TRUE(at::equal(bias, t.to(at::kFloat)));
    }
  EXPECT_EQ(state.count("model.layers.0.mlp.gate.e_score_correction_bias"), 0u);  // the dense first layer
}

TEST(DeepseekV3Bias, MissingIsExit3NamingIt) {
  TempDir tmp;
  const fs::path dir = without_bias(kFixture, tmp / "m");
  expect_failure(cli_logits(fixture(kFixture), dir, tmp / "l.safetensors"), 3, {kBias});
}

TEST(DeepseekV3Bias, MissingOnReloadIsInputErrorAndLeavesTheModelUntouched) {
  TempDir tmp;
  const fs::path dir = without_bias("deepseek_v3_bf16_qlora_b", tmp / "m");
  auto model = load_model(fixture("deepseek_v3_bf16_qlora").dir);
  const auto before = kernel_state(*model);
  try {
    model->reload(dir.string());
    FAIL() << "a reload without " << kBias << " succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input) << e.what();
    EXPECT_NE(std::string(e.what()).find(kBias), std::string::npos) << e.what();
  }
  expect_identical(kernel_state(*model), before);
}

// ------------------------------------------------------------ config sizes

struct BadConfig {
  std::string name;
  nlohmann::json edit;                 ///< keys set in config.json
  std::vector<std::string> fragments;  ///< what the one error line names
};

void PrintTo(const BadConfig& bad, std::ostream* os) { *os << bad.name << " " << bad.edit.dump(); }

class DeepseekV3Config : public ::testing::TestWithParam<BadConfig> {};

TEST_P(DeepseekV3Config, IsExit3NamingTheKey) {
  const BadConfig& bad = GetParam();
  const Fixture& f = fixture(kFixture);  // 8 experts in 4 groups, 2 groups and 3 experts a token
  TempDir tmp;
  const fs::path dir = copy_fixture(f, tmp / "m");
  edit_config(dir, [&](nlohmann::json& c) { c.update(bad.edit); });
  expect_failure(cli_logits(f, dir, tmp / "l.safetensors"), 3, bad.fragments);
}

INSTANTIATE_TEST_SUITE_P(
    Edits, DeepseekV3Config,
    ::testing::Values(
        BadConfig{"GroupsNotDividingExperts", {{"n_group", 3}}, {"'n_group'", "'n_routed_experts'"}},
        BadConfig{"TopkGroupAboveGroups", {{"topk_group", 5}}, {"'topk_group' (5)", "'n_group' (4)"}},
        BadConfig{"MoreExpertsPerTokenThanTheChosenGroupsHold", {{"num_experts_per_tok", 5}},
                  {"'num_experts_per_tok' (5)", "topk_group * (n_routed_experts / n_group)"}},
        BadConfig{"OneExpertPerGroup", {{"n_group", 8}, {"topk_group", 4}}, {"n_group", "two best"}},
        BadConfig{"ZeroGroups", {{"n_group", 0}}, {"'n_group'"}},
        BadConfig{"NullTopkGroup", {{"topk_group", nullptr}}, {"'topk_group'"}},
        BadConfig{"OtherTopkMethod", {{"topk_method", "greedy"}}, {"topk_method", "noaux_tc"}},
        BadConfig{"SoftmaxScoring", {{"scoring_func", "softmax"}}, {"scoring_func", "sigmoid"}},
        BadConfig{"NegativeMtpLayers", {{"num_nextn_predict_layers", -1}}, {"'num_nextn_predict_layers'"}}),
    [](const ::testing::TestParamInfo<BadConfig>& info) { return info.param.name; });

// ------------------------------------------------------------ block fp8

std::map<std::string, const void*> data_ptrs(LoadedModel& m) {
  std::map<std::string, const void*> out;
  for (auto& [name, p] : m.model().named_parameters()) out[name] = p->data.data_ptr();
  return out;
}

/// The block-fp8 fixture loaded on the parameter's device, its reload target, and its parameters' addresses.
class DeepseekV3BlockFp8 : public ::testing::TestWithParam<std::string /*device*/> {
 protected:
  void SetUp() override {
    device = GetParam();
    SKIP_WITHOUT(device);
    a = &fixture("deepseek_v3_blockfp8");
    b = &fixture(a->reload_target);
    model = load_model(a->dir, device);
    ptrs = data_ptrs(*model);
  }

  std::string device;
  const Fixture* a = nullptr;
  const Fixture* b = nullptr;
  std::unique_ptr<LoadedModel> model;
  std::map<std::string, const void*> ptrs;
};

// As DeepSeek-V3 ships: every projection fp8 with 128x128 block scales (partial blocks at the edges),
// kv_b_proj included; router, its bias, norms, embeddings and lm_head 16-bit (the router float32).
TEST_P(DeepseekV3BlockFp8, LoadsInVllmLayout) {
  EXPECT_EQ(model->report().quantization, "fp8");
  auto state = kernel_state(*model);
  const std::map<std::string, std::vector<int64_t>> scales = {
      // attention of 4 heads: q_lora_rank 96, kv_lora_rank 64, q/k heads 32 + 16, v heads 32
      {"model.layers.1.self_attn.q_a_proj", {1, 2}},            // [96, 256]
      {"model.layers.1.self_attn.q_b_proj", {2, 1}},            // [192, 96]
      {"model.layers.1.self_attn.kv_a_proj_with_mqa", {1, 2}},  // [80, 256]
      {"model.layers.1.self_attn.kv_b_proj", {2, 1}},           // [256, 64]
      {"model.layers.1.self_attn.o_proj", {2, 1}},              // [256, 128]
      {"model.layers.0.mlp.gate_up_proj", {6, 2}},              // gate and up of 384: 3 block rows each
      {"model.layers.0.mlp.down_proj", {2, 3}},
      {"model.layers.1.mlp.shared_experts.gate_up_proj", {4, 2}},  // one shared expert of 192
      {"model.layers.1.mlp.experts.w13", {8, 4, 2}},               // 8 experts of 192
      {"model.layers.1.mlp.experts.w2", {8, 2, 2}},
  };
  for (const auto& [layer, shape] : scales) {
    const bool experts = layer.ends_with(".w13") || layer.ends_with(".w2");
    const std::string weight = layer + (experts ? "_weight" : ".weight");
    EXPECT_EQ(state.at(weight).scalar_type(), at::kFloat8_e4m3fn) << weight;
    const at::Tensor& s = state.at(weight + "_scale_inv");
    EXPECT_EQ(s.sizes(), at::IntArrayRef(shape)) << weight;
    EXPECT_EQ(s.scalar_type(), at::kFloat) << weight;
  }
  EXPECT_EQ(state.at("model.layers.1.mlp.gate.weight").scalar_type(), at::kFloat);
  EXPECT_EQ(state.at(kBias).scalar_type(), at::kFloat);
  EXPECT_EQ(state.at("lm_head.weight").scalar_type(), at::kBFloat16);
  EXPECT_EQ(state.at("model.embed_tokens.weight").scalar_type(), at::kBFloat16);
  for (const auto& [name, t] : state) EXPECT_FALSE(name.starts_with("model.layers.3.")) << name;
}

TEST_P(DeepseekV3BlockFp8, ReloadFp8EqualsFreshLoadInPlace) {
  const auto fresh_a = kernel_state(*model);
  EXPECT_TRUE(model->reload(b->dir).pointers_stable);
  EXPECT_EQ(data_ptrs(*model), ptrs);
  auto fresh_b = load_model(b->dir, device);
  expect_identical(kernel_state(*model), kernel_state(*fresh_b));
  EXPECT_TRUE(at::equal(model->logits(b->tokens), fresh_b->logits(b->tokens)));
  model->reload(a->dir);
  expect_identical(kernel_state(*model), fresh_a);
}

// b is b's 16-bit source quantized offline by tests/fixtures/fp8_quant.py; the MTP layer comes along and is skipped.
TEST_P(DeepseekV3BlockFp8, ReloadFromBf16QuantizesAsTheReference) {
  EXPECT_TRUE(model->reload(fixture(b->name + "_bf16src").dir).pointers_stable);
  EXPECT_EQ(data_ptrs(*model), ptrs);
  expect_identical(kernel_state(*model), kernel_state(*load_model(b->dir, device)));
}

INSTANTIATE_TEST_SUITE_P(Devices, DeepseekV3BlockFp8, ::testing::Values("cpu", "cuda"),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace loadkit::test
