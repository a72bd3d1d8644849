// DeepSeek-V2's routed experts: stacked into FusedMoE's w13/w2 (checked against the
// checkpoint's per-expert tensors), quantized per expert while the router gate stays
// float32, and split across tensor-parallel ranks along the intermediate dimension.
// Expected values are cut out of the checkpoint tensors here with plain slicing.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <map>

#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/model_config.h"
#include "loadkit/model_context.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "loadkit/weights.h"
#include "model_checks.h"
#include "tensor_io.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr const char* kFixture = "deepseek_v2_fp32_qlora_grouped_yarn";
constexpr int64_t kMoELayers[] = {1, 2};  // layer 0 is dense (first_k_dense_replace = 1)

/// Every tensor of the fixture's checkpoint, by name.
std::map<std::string, at::Tensor> checkpoint(const Fixture& f) {
  std::map<std::string, at::Tensor> out;
  for (const auto& entry : std::filesystem::directory_iterator(f.dir))
    if (entry.path().extension() == ".safetensors")
      for (auto& [name, t] : load_tensors(entry.path().string())) out[name] = t;
  return out;
}

ModelConfig config_of(const Fixture& f) { return ModelConfig::from_file(f.dir + "/config.json"); }

std::string layer(int64_t l) { return "model.layers." + std::to_string(l) + "."; }
std::string expert(int64_t l, int64_t e, const char* proj) {
  return layer(l) + "mlp.experts." + std::to_string(e) + "." + proj + ".weight";
}

/// Builds the plugin's tree for (rank, size), without a process group, and loads the checkpoint into it.
std::shared_ptr<CausalLM> build_rank(const Fixture& f, int rank, int size) {
  ModelContext ctx;
  ctx.config = config_of(f);
  ctx.tp_rank = rank;
  ctx.tp_size = size;
  auto model = build_registry().create_model(f.architecture, ctx);
  std::vector<NamedWeight> weights;
  for (auto& [name, t] : checkpoint(f)) weights.push_back({name, t, f.dir});
  VectorWeightStream stream(std::move(weights));
  model->load_weights(stream);
  return model;
}

std::map<std::string, at::Tensor> params_of(const Module& root) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, p] : root.named_parameters()) out[name] = p->data;
  return out;
}

TEST(DeepseekV2Experts, GateAndUpStackIntoW13HalvesAndDownIntoW2) {
  const auto& f = fixture(kFixture);
  const auto cfg = config_of(f);
  const int64_t experts = cfg.get_int("n_routed_experts"), inter = cfg.get_int("moe_intermediate_size");
  auto ckpt = checkpoint(f);
  auto model = load_model(f.dir);
  auto state = kernel_state(*model);
  for (int64_t l : kMoELayers) {
    const at::Tensor w13 = state.at(layer(l) + "mlp.experts.w13_weight");
    const at::Tensor w2 = state.at(layer(l) + "mlp.experts.w2_weight");
    ASSERT_EQ(w13.sizes(), at::IntArrayRef({experts, 2 * inter, cfg.get_int("hidden_size")}));
    ASSERT_EQ(w2.sizes(), at::IntArrayRef({experts, cfg.get_int("hidden_size"), inter}));
    for (int64_t e = 0; e < experts; ++e) {
      EXPECT_TRUE(at::equal(w13[e].narrow(0, 0, inter), ckpt.at(expert(l, e, "gate_proj")))) << l << "/" << e;
      EXPECT_TRUE(at::equal(w13[e].narrow(0, inter, inter), ckpt.at(expert(l, e, "up_proj")))) << l << "/" << e;
      EXPECT_TRUE(at::equal(w2[e], ckpt.at(expert(l, e, "down_proj")))) << l << "/" << e;
    }
    // Shared experts are a plain MLP beside them; the first layer has no experts at all.
    EXPECT_TRUE(at::equal(state.at(layer(l) + "mlp.shared_experts.gate_up_proj.weight"),
                          at::cat({ckpt.at(layer(l) + "mlp.shared_experts.gate_proj.weight"),
                                   ckpt.at(layer(l) + "mlp.shared_experts.up_proj.weight")})));
  }
  EXPECT_TRUE(state.count(layer(0) + "mlp.gate_up_proj.weight"));
  EXPECT_FALSE(state.count(layer(0) + "mlp.experts.w13_weight"));
}

/// max(|a|) over all tensors.
double amax(std::initializer_list<at::Tensor> parts) {
  double m = 0;
  for (const auto& t : parts) m = std::max(m, t.abs().max().item<double>());
  return m;
}

TEST(DeepseekV2Experts, Fp8QuantizesEachExpertWithItsOwnScaleAndLeavesTheRouter) {
  const auto& f = fixture(kFixture);
  const int64_t experts = config_of(f).get_int("n_routed_experts");
  auto ckpt = checkpoint(f);
  auto model = load_model(f.dir, "cpu", "fp8");
  auto state = kernel_state(*model);
  for (int64_t l : kMoELayers) {
    const std::string moe = layer(l) + "mlp.";
    const at::Tensor w13 = state.at(moe + "experts.w13_weight"), w2 = state.at(moe + "experts.w2_weight");
    const at::Tensor s13 = state.at(moe + "experts.w13_weight_scale"), s2 = state.at(moe + "experts.w2_weight_scale");
    EXPECT_EQ(w13.scalar_type(), at::kFloat8_e4m3fn);
    EXPECT_EQ(w2.scalar_type(), at::kFloat8_e4m3fn);
    ASSERT_EQ(s13.sizes(), at::IntArrayRef({experts}));
    ASSERT_EQ(s2.sizes(), at::IntArrayRef({experts}));
    for (int64_t e = 0; e < experts; ++e) {
      const at::Tensor gate_up = at::cat({ckpt.at(expert(l, e, "gate_proj")), ckpt.at(expert(l, e, "up_proj"))});
      const at::Tensor down = ckpt.at(expert(l, e, "down_proj"));
      EXPECT_NEAR(s13[e].item<double>(), amax({gate_up}) / 448.0, 1e-9) << l << "/" << e;
      EXPECT_NEAR(s2[e].item<double>(), amax({down}) / 448.0, 1e-9) << l << "/" << e;
      // e4m3 keeps 3 mantissa bits: every element within 1/16 of its expert's largest.
      EXPECT_LE(amax({w13[e].to(at::kFloat) * s13[e] - gate_up}), amax({gate_up}) / 16) << l << "/" << e;
      EXPECT_LE(amax({w2[e].to(at::kFloat) * s2[e] - down}), amax({down}) / 16) << l << "/" << e;
    }
    // The router is never quantized: float32, the checkpoint's values, no scale.
    EXPECT_EQ(state.at(moe + "gate.weight").scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(state.at(moe + "gate.weight"), ckpt.at(moe + "gate.weight")));
    EXPECT_FALSE(state.count(moe + "gate.weight_scale"));
    // The other linear layers are quantized as usual, except kv_b_proj (see the plugin): the
    // checkpoint's values, no scale.
    EXPECT_EQ(state.at(moe + "shared_experts.gate_up_proj.weight").scalar_type(), at::kFloat8_e4m3fn);
    EXPECT_EQ(state.at(layer(l) + "self_attn.o_proj.weight").scalar_type(), at::kFloat8_e4m3fn);
    const std::string kv_b = layer(l) + "self_attn.kv_b_proj.weight";
    EXPECT_EQ(state.at(kv_b).scalar_type(), at::kFloat);
    EXPECT_TRUE(at::equal(state.at(kv_b), ckpt.at(kv_b)));
    EXPECT_FALSE(state.count(layer(l) + "self_attn.kv_b_proj.weight_scale"));
  }
}

TEST(DeepseekV2Experts, Int8QuantizesEveryExpertRowWithItsOwnScale) {
  const auto& f = fixture(kFixture);
  const auto cfg = config_of(f);
  const int64_t experts = cfg.get_int("n_routed_experts"), inter = cfg.get_int("moe_intermediate_size");
  const int64_t hidden = cfg.get_int("hidden_size");
  auto ckpt = checkpoint(f);
  auto model = load_model(f.dir, "cpu", "int8");
  auto state = kernel_state(*model);
  const std::string moe = layer(1) + "mlp.";
  const at::Tensor w13 = state.at(moe + "experts.w13_weight"), s13 = state.at(moe + "experts.w13_weight_scale");
  const at::Tensor w2 = state.at(moe + "experts.w2_weight"), s2 = state.at(moe + "experts.w2_weight_scale");
  EXPECT_EQ(w13.scalar_type(), at::kChar);
  EXPECT_EQ(w2.scalar_type(), at::kChar);
  ASSERT_EQ(s13.sizes(), at::IntArrayRef({experts, 2 * inter}));
  ASSERT_EQ(s2.sizes(), at::IntArrayRef({experts, hidden}));
  for (int64_t e = 0; e < experts; ++e) {
    const at::Tensor gate_up = at::cat({ckpt.at(expert(1, e, "gate_proj")), ckpt.at(expert(1, e, "up_proj"))});
    const at::Tensor down = ckpt.at(expert(1, e, "down_proj"));
    EXPECT_TRUE(at::allclose(s13[e], std::get<0>(gate_up.abs().max(1)) / 127.0, 1e-6, 0)) << e;
    EXPECT_TRUE(at::allclose(s2[e], std::get<0>(down.abs().max(1)) / 127.0, 1e-6, 0)) << e;
    // Rounding to the nearest step: within half a step of every row's scale.
    EXPECT_TRUE((w13[e].to(at::kFloat) * s13[e].unsqueeze(1) - gate_up).abs().le(s13[e].unsqueeze(1) * 0.5001).all().item<bool>());
  }
  EXPECT_EQ(state.at(moe + "gate.weight").scalar_type(), at::kFloat);
  EXPECT_FALSE(state.count(moe + "gate.weight_scale"));
}

TEST(DeepseekV2Experts, TensorParallelRanksHoldTheirSliceOfEveryExpert) {
  const auto& f = fixture(kFixture);
  const auto cfg = config_of(f);
  const int64_t experts = cfg.get_int("n_routed_experts"), inter = cfg.get_int("moe_intermediate_size");
  const int64_t hidden = cfg.get_int("hidden_size"), half = inter / 2;
  auto ckpt = checkpoint(f);
  for (int rank = 0; rank < 2; ++rank) {
    auto model = build_rank(f, rank, 2);
    EXPECT_TRUE(uninitialized_parameters(*model).empty()) << "rank " << rank;
    auto params = params_of(*model);
    for (int64_t l : kMoELayers) {
      const at::Tensor w13 = params.at(layer(l) + "mlp.experts.w13_weight");
      const at::Tensor w2 = params.at(layer(l) + "mlp.experts.w2_weight");
      ASSERT_EQ(w13.sizes(), at::IntArrayRef({experts, 2 * half, hidden}));
      ASSERT_EQ(w2.sizes(), at::IntArrayRef({experts, hidden, half}));
      for (int64_t e = 0; e < experts; ++e) {
        EXPECT_TRUE(at::equal(w13[e].narrow(0, 0, half), ckpt.at(expert(l, e, "gate_proj")).narrow(0, rank * half, half)));
        EXPECT_TRUE(at::equal(w13[e].narrow(0, half, half), ckpt.at(expert(l, e, "up_proj")).narrow(0, rank * half, half)));
        EXPECT_TRUE(at::equal(w2[e], ckpt.at(expert(l, e, "down_proj")).narrow(1, rank * half, half)));
      }
      // Every rank routes: the whole router on each.
      EXPECT_TRUE(at::equal(params.at(layer(l) + "mlp.gate.weight"), ckpt.at(layer(l) + "mlp.gate.weight")));
    }
    // MLA: the latent projection is replicated, the per-head ones split by heads.
    const at::Tensor kv_b = ckpt.at(layer(0) + "self_attn.kv_b_proj.weight");
    EXPECT_TRUE(at::equal(params.at(layer(0) + "self_attn.kv_b_proj.weight"),
                          kv_b.narrow(0, rank * kv_b.size(0) / 2, kv_b.size(0) / 2)));
    EXPECT_TRUE(at::equal(params.at(layer(0) + "self_attn.kv_a_proj_with_mqa.weight"),
                          ckpt.at(layer(0) + "self_attn.kv_a_proj_with_mqa.weight")));
  }
}

TEST(DeepseekV2Experts, ExpertBeyondTheConfigIsAnUnknownTensor) {
  const auto& f = fixture(kFixture);
  ModelContext ctx;
  ctx.config = config_of(f);
  auto model = build_registry().create_model(f.architecture, ctx);
  const int64_t experts = ctx.config.get_int("n_routed_experts");
  auto ckpt = checkpoint(f);
  const std::string name = expert(1, experts, "gate_proj");
  VectorWeightStream stream({{name, ckpt.at(expert(1, 0, "gate_proj")), "extra.safetensors"}});
  try {
    model->load_weights(stream);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
}

TEST(DeepseekV2Experts, WronglyShapedExpertNamesTensorAndExpert) {
  const auto& f = fixture(kFixture);
  ModelContext ctx;
  ctx.config = config_of(f);
  auto model = build_registry().create_model(f.architecture, ctx);
  auto ckpt = checkpoint(f);
  const std::string name = expert(2, 3, "up_proj");
  VectorWeightStream stream({{name, ckpt.at(expert(2, 3, "down_proj")), "bad.safetensors"}});
  try {
    model->load_weights(stream);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    const std::string what = e.what();
    EXPECT_NE(what.find(name), std::string::npos) << what;
    EXPECT_NE(what.find("expert 3"), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace loadkit::test
