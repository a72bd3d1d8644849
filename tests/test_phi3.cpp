// Phi3's fused checkpoint tensors under tensor parallelism: a rank built with
// tp_rank/tp_size (no process group: loading needs none) gets from the fused
// qkv_proj and gate_up_proj exactly the rows that separate q/k/v and gate/up
// tensors give it, and the rows cut here by plain slicing of q, k, v, gate, up.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/model_context.h"
#include "loadkit/runtime/registry.h"
#include "test_support.h"

namespace loadkit {
namespace {

constexpr int64_t kHidden = 16, kHeadDim = 4, kHeads = 4, kInter = 12, kVocab = 70;

std::string phi3_config(int64_t kv_heads) {
  return R"({"architectures": ["Phi3ForCausalLM"], "hidden_size": 16, "intermediate_size": 12,
             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": )" +
         std::to_string(kv_heads) + R"(, "vocab_size": 70, "max_position_embeddings": 64})";
}

/// One layer's checkpoint tensors, distinct values everywhere.
struct Checkpoint {
  at::Tensor q, k, v, o, gate, up, down, embed, lm_head, norm1, norm2, norm;

  explicit Checkpoint(int64_t kv_heads) {
    at::manual_seed(7);
    q = at::randn({kHeads * kHeadDim, kHidden});
    k = at::randn({kv_heads * kHeadDim, kHidden});
    v = at::randn({kv_heads * kHeadDim, kHidden});
    o = at::randn({kHidden, kHeads * kHeadDim});
    gate = at::randn({kInter, kHidden});
    up = at::randn({kInter, kHidden});
    down = at::randn({kHidden, kInter});
    embed = at::randn({kVocab, kHidden});
    lm_head = at::randn({kVocab, kHidden});
    norm1 = at::randn({kHidden});
    norm2 = at::randn({kHidden});
    norm = at::randn({kHidden});
  }

  std::vector<NamedWeight> common() const {
    const std::string l = "model.layers.0.";
    return {{"model.embed_tokens.weight", embed, "test"},
            {l + "self_attn.o_proj.weight", o, "test"},
            {l + "mlp.down_proj.weight", down, "test"},
            {l + "input_layernorm.weight", norm1, "test"},
            {l + "post_attention_layernorm.weight", norm2, "test"},
            {"model.norm.weight", norm, "test"},
            {"lm_head.weight", lm_head, "test"}};
  }
  /// As Phi3 checkpoints store them.
  std::vector<NamedWeight> fused() const {
    auto w = common();
    w.push_back({"model.layers.0.self_attn.qkv_proj.weight", at::cat({q, k, v}), "test"});
    w.push_back({"model.layers.0.mlp.gate_up_proj.weight", at::cat({gate, up}), "test"});
    return w;
  }
  /// As Llama-style checkpoints store them.
  std::vector<NamedWeight> separate() const {
    auto w = common();
    const std::string l = "model.layers.0.";
    w.push_back({l + "self_attn.q_proj.weight", q, "test"});
    w.push_back({l + "self_attn.k_proj.weight", k, "test"});
    w.push_back({l + "self_attn.v_proj.weight", v, "test"});
    w.push_back({l + "mlp.gate_proj.weight", gate, "test"});
    w.push_back({l + "mlp.up_proj.weight", up, "test"});
    return w;
  }
};

class Phi3Shards : public ::testing::TestWithParam<std::tuple<int /*tp_size*/, int64_t /*kv_heads*/>> {
 protected:
  std::shared_ptr<CausalLM> build(int rank, int size, int64_t kv_heads) {
    ModelContext ctx;
    ctx.config = ModelConfig::parse(phi3_config(kv_heads), "phi3-test/config.json");
    ctx.tp_rank = rank;
    ctx.tp_size = size;
    return registry_.create_model("Phi3ForCausalLM", ctx);
  }
  static std::map<std::string, at::Tensor> load(CausalLM& model, std::vector<NamedWeight> weights) {
    VectorWeightStream stream(std::move(weights));
    model.load_weights(stream);
    EXPECT_TRUE(uninitialized_parameters(model).empty());
    std::map<std::string, at::Tensor> out;
    for (const auto& [name, p] : model.named_parameters()) out[name] = p->data;
    return out;
  }
  Registry registry_{{test::plugin_dir()}};
};

TEST_P(Phi3Shards, FusedTensorsGiveTheSameRankShardsAsSeparateOnes) {
  const auto [size, kv_heads] = GetParam();
  const Checkpoint ckpt(kv_heads);
  // kv heads split over the ranks when there are enough, else each rank holds one, replicated.
  const int64_t q_rows = kHeads * kHeadDim / size;
  const int64_t kv_rows = kv_heads >= size ? kv_heads * kHeadDim / size : kHeadDim;
  const int64_t ranks_per_kv = kv_heads >= size ? 1 : size / kv_heads;
  const int64_t inter_rows = kInter / size;
  for (int rank = 0; rank < size; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank) + " of " + std::to_string(size));
    auto fused_model = build(rank, size, kv_heads);
    auto separate_model = build(rank, size, kv_heads);
    auto fused = load(*fused_model, ckpt.fused());
    auto separate = load(*separate_model, ckpt.separate());

    ASSERT_EQ(fused.size(), separate.size());
    for (const auto& [name, tensor] : fused) {
      ASSERT_TRUE(separate.count(name)) << name;
      EXPECT_TRUE(at::equal(tensor, separate.at(name))) << name;
    }
    const int64_t kv_start = (rank / ranks_per_kv) * kv_rows;
    at::Tensor want_qkv = at::cat({ckpt.q.narrow(0, rank * q_rows, q_rows), ckpt.k.narrow(0, kv_start, kv_rows),
                                   ckpt.v.narrow(0, kv_start, kv_rows)});
    at::Tensor want_gate_up =
        at::cat({ckpt.gate.narrow(0, rank * inter_rows, inter_rows), ckpt.up.narrow(0, rank * inter_rows, inter_rows)});
    EXPECT_TRUE(at::equal(fused.at("model.layers.0.self_attn.qkv_proj.weight"), want_qkv));
    EXPECT_TRUE(at::equal(fused.at("model.layers.0.mlp.gate_up_proj.weight"), want_gate_up));
    const int64_t o_cols = kHeads * kHeadDim / size;
    EXPECT_TRUE(at::equal(fused.at("model.layers.0.self_attn.o_proj.weight"), ckpt.o.narrow(1, rank * o_cols, o_cols)));
  }
}

INSTANTIATE_TEST_SUITE_P(TpAndKvHeads, Phi3Shards,
                         ::testing::Values(std::make_tuple(1, int64_t{2}), std::make_tuple(2, int64_t{2}),
                                           std::make_tuple(2, int64_t{1}), std::make_tuple(2, int64_t{4})),
                         [](const auto& info) {
                           return "tp" + std::to_string(std::get<0>(info.param)) + "_kv" +
                                  std::to_string(std::get<1>(info.param));
                         });

TEST(Phi3Fused, WrongSizedFusedTensorFailsNamingIt) {
  Registry registry({test::plugin_dir()});
  ModelContext ctx;
  ctx.config = ModelConfig::parse(phi3_config(2), "phi3-test/config.json");
  auto model = registry.create_model("Phi3ForCausalLM", ctx);
  // q + k + v would be 16 + 8 + 8 = 32 rows.
  VectorWeightStream stream({{"model.layers.0.self_attn.qkv_proj.weight", at::zeros({30, kHidden}), "bad.safetensors"}});
  try {
    model->load_weights(stream);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find("qkv_proj"), std::string::npos) << e.what();
  }
}

TEST(Phi3Config, LongropeFactorsOfTheWrongLengthFailNamingTheKey) {
  Registry registry({test::plugin_dir()});
  ModelContext ctx;
  std::string cfg = phi3_config(2);
  cfg.pop_back();  // head_dim 4: longrope wants 2 factors per set
  cfg += R"(, "original_max_position_embeddings": 16, "rope_scaling": {"type": "longrope",
            "short_factor": [1.0, 2.0, 3.0], "long_factor": [1.0, 2.0]}})";
  ctx.config = ModelConfig::parse(cfg, "phi3-test/config.json");
  try {
    registry.create_model("Phi3ForCausalLM", ctx);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find("short_factor"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("phi3-test/config.json"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace loadkit
