// SDK: the module tree, weight loaders (with tensor-parallel shards) and AutoWeightsLoader.
// Expected shards are cut out of the full tensors here with plain slicing.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/error.h"
#include "loadkit/layers/embedding.h"
#include "loadkit/layers/linear.h"
#include "loadkit/layers/norm.h"
#include "loadkit/model_config.h"

namespace loadkit {
namespace {

ModelContext context(int rank = 0, int size = 1) {
  ModelContext ctx;
  ctx.config = ModelConfig::parse("{}", "test-config.json");
  ctx.tp_rank = rank;
  ctx.tp_size = size;
  return ctx;
}

at::Tensor arange2d(int64_t rows, int64_t cols) {
  return at::arange(rows * cols, at::kFloat).view({rows, cols});
}

template <class F>
std::string error_of(F&& f, ErrorKind want = ErrorKind::Input) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), want) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

TEST(ModuleTree, NamedParametersAreQualifiedInRegistrationOrder) {
  Module root("Root");
  auto& child = root.add_module("model", std::make_shared<Module>("Inner"));
  child.add_parameter("weight", at::zeros({2}));
  root.add_parameter("scale", at::zeros({1}));
  auto names = root.named_parameters();
  ASSERT_EQ(names.size(), 2u);
  EXPECT_EQ(names[0].first, "scale");
  EXPECT_EQ(names[1].first, "model.weight");
}

TEST(ModuleTree, SharedParameterIsListedOnce) {
  auto ctx = context();
  Module root("Root");
  auto& embed = root.add_module("embed_tokens", std::make_shared<VocabParallelEmbedding>(100, 8, ctx));
  auto& head = root.add_module("lm_head", std::make_shared<ParallelLMHead>(100, 8, ctx));
  head.tie_to(embed);
  auto names = root.named_parameters();
  ASSERT_EQ(names.size(), 1u);
  EXPECT_EQ(names[0].first, "embed_tokens.weight");
  EXPECT_EQ(&head.param("weight"), &embed.param("weight"));
}

TEST(Loaders, ColumnParallelTakesThisRanksRows) {
  auto full = arange2d(6, 4);
  for (int rank = 0; rank < 2; ++rank) {
    ColumnParallelLinear layer(4, 6, context(rank, 2), {.bias = true});
    auto& w = layer.param("weight");
    EXPECT_EQ(w.loader(w, full, {}), 12);
    EXPECT_TRUE(at::equal(w.data, full.narrow(0, 3 * rank, 3)));
    auto& b = layer.param("bias");
    b.loader(b, at::arange(6, at::kFloat), {});
    EXPECT_TRUE(at::equal(b.data, at::arange(6, at::kFloat).narrow(0, 3 * rank, 3)));
  }
}

TEST(Loaders, RowParallelTakesThisRanksColumns) {
  auto full = arange2d(3, 8);
  RowParallelLinear layer(8, 3, context(1, 2));
  auto& w = layer.param("weight");
  EXPECT_EQ(w.loader(w, full, {}), 12);
  EXPECT_TRUE(at::equal(w.data, full.narrow(1, 4, 4)));
}

TEST(Loaders, MergedColumnPlacesEachShard) {
  auto gate = arange2d(4, 3), up = arange2d(4, 3) + 100;
  MergedColumnParallelLinear layer(3, {4, 4}, context(1, 2));
  auto& w = layer.param("weight");
  EXPECT_EQ(w.loader(w, gate, {"0"}), 6);
  EXPECT_EQ(w.loader(w, up, {"1"}), 6);
  EXPECT_TRUE(at::equal(w.data, at::cat({gate.narrow(0, 2, 2), up.narrow(0, 2, 2)})));
  // A fused checkpoint tensor (no shard id) is split into the same places.
  MergedColumnParallelLinear fused(3, {4, 4}, context(1, 2));
  auto& fw = fused.param("weight");
  EXPECT_EQ(fw.loader(fw, at::cat({gate, up}), {}), 12);
  EXPECT_TRUE(at::equal(fw.data, w.data));
}

TEST(Loaders, QKVReplicatesKvHeadsWhenRanksOutnumberThem) {
  // 4 query heads, 1 kv head, head size 2, over 2 ranks: each rank gets 2 q heads and the one kv head.
  auto q = arange2d(8, 5), k = arange2d(2, 5) + 1000, v = arange2d(2, 5) + 2000;
  for (int rank = 0; rank < 2; ++rank) {
    QKVParallelLinear layer(5, 2, 4, 1, context(rank, 2));
    EXPECT_EQ(layer.num_heads(), 2);
    EXPECT_EQ(layer.num_kv_heads(), 1);
    auto& w = layer.param("weight");
    w.loader(w, q, {"q"});
    w.loader(w, k, {"k"});
    w.loader(w, v, {"v"});
    EXPECT_TRUE(at::equal(w.data, at::cat({q.narrow(0, 4 * rank, 4), k, v})));
  }
}

TEST(Loaders, QKVSplitsKvHeadsWhenEnough) {
  auto q = arange2d(8, 3), k = arange2d(4, 3) + 50, v = arange2d(4, 3) + 90;
  QKVParallelLinear layer(3, 2, 4, 2, context(1, 2));
  auto& w = layer.param("weight");
  w.loader(w, at::cat({q, k, v}), {});  // fused (GPTBigCode, Phi3 style)
  EXPECT_TRUE(at::equal(w.data, at::cat({q.narrow(0, 4, 4), k.narrow(0, 2, 2), v.narrow(0, 2, 2)})));
}

TEST(Loaders, WrongShapeIsAnErrorAndWritesNothing) {
  ColumnParallelLinear layer(4, 6, context());
  auto& w = layer.param("weight");
  w.data.fill_(7);
  auto msg = error_of([&] { w.loader(w, arange2d(7, 4), {}); });
  EXPECT_NE(msg.find("[7, 4]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[6, 4]"), std::string::npos) << msg;
  EXPECT_TRUE(at::equal(w.data, at::full({6, 4}, 7.0)));
}

TEST(Loaders, UnknownShardIdIsAnError) {
  QKVParallelLinear layer(3, 2, 2, 1, context());
  auto& w = layer.param("weight");
  EXPECT_NE(error_of([&] { w.loader(w, arange2d(4, 3), {"z"}); }).find("'z'"), std::string::npos);
}

TEST(Loaders, VocabIsPaddedTo64WithZeroRows) {
  auto full = arange2d(100, 3) + 1;
  for (int rank = 0; rank < 2; ++rank) {
    VocabParallelEmbedding embed(100, 3, context(rank, 2));
    EXPECT_EQ(embed.padded_vocab_size(), 128);
    auto& w = embed.param("weight");
    ASSERT_EQ(w.data.size(0), 64);
    w.data.fill_(-1);  // stale contents must not survive a load
    const int64_t rows = rank == 0 ? 64 : 36;
    EXPECT_EQ(w.loader(w, full, {}), rows * 3);
    EXPECT_EQ(w.expected_load_numel, rows * 3);
    EXPECT_TRUE(at::equal(w.data.narrow(0, 0, rows), full.narrow(0, 64 * rank, rows)));
    EXPECT_TRUE(at::equal(w.data.narrow(0, rows, 64 - rows), at::zeros({64 - rows, 3})));
  }
}

// ------------------------------------------------------- AutoWeightsLoader

struct Tiny {
  Module root{"TinyForCausalLM"};
  Tiny() {
    auto ctx = context();
    auto& model = root.add_module("model", std::make_shared<Module>("TinyModel"));
    auto& layers = model.add_module("layers", std::make_shared<ModuleList>());
    auto& layer = layers.append(std::make_shared<Module>("TinyLayer"));
    layer.add_module("qkv_proj", std::make_shared<QKVParallelLinear>(4, 2, 2, 1, ctx));
    layer.add_module("norm", std::make_shared<RMSNorm>(4, 1e-6, ctx));
  }
  WeightMapping mapping() const {
    WeightMapping m;
    m.stacked = {{".qkv_proj", ".q_proj", {"q"}}, {".qkv_proj", ".k_proj", {"k"}}, {".qkv_proj", ".v_proj", {"v"}}};
    m.skip_substrs = {"rotary_emb.inv_freq"};
    m.mapper.prefixes = {{"transformer.", "model."}};
    return m;
  }
  static NamedWeight w(std::string name, at::Tensor t) { return {std::move(name), std::move(t), "test.safetensors"}; }
};

TEST(AutoWeightsLoader, StackedNamesReachTheirShards) {
  Tiny tiny;
  VectorWeightStream stream({Tiny::w("model.layers.0.q_proj.weight", arange2d(4, 4)),
                             Tiny::w("model.layers.0.k_proj.weight", arange2d(2, 4) + 16),
                             Tiny::w("transformer.layers.0.v_proj.weight", arange2d(2, 4) + 24),
                             Tiny::w("model.layers.0.norm.weight", at::ones({4})),
                             Tiny::w("model.layers.0.rotary_emb.inv_freq", at::ones({2}))});
  reset_load_counts(tiny.root);
  auto loaded = AutoWeightsLoader(tiny.root, tiny.mapping()).load(stream);
  EXPECT_EQ(loaded, (std::set<std::string>{"model.layers.0.qkv_proj.weight", "model.layers.0.norm.weight"}));
  EXPECT_TRUE(uninitialized_parameters(tiny.root).empty());
  auto* qkv = tiny.root.find_child("model")->find_child("layers")->find_child("0")->find_child("qkv_proj");
  EXPECT_TRUE(at::equal(qkv->param("weight").data, arange2d(8, 4)));
}

TEST(AutoWeightsLoader, UnknownNameNamesTheDeepestModule) {
  Tiny tiny;
  auto msg = error_of([&] { AutoWeightsLoader(tiny.root, tiny.mapping()).load_one(Tiny::w("model.layers.0.mlp.weight", at::ones({1}))); });
  EXPECT_EQ(msg.rfind("There is no module or parameter named 'model.layers.0.mlp' in TinyLayer", 0), 0u) << msg;
  EXPECT_NE(msg.find("test.safetensors"), std::string::npos);
  msg = error_of([&] { AutoWeightsLoader(tiny.root, tiny.mapping()).load_one(Tiny::w("lm_head.weight", at::ones({1}))); });
  EXPECT_EQ(msg.rfind("There is no module or parameter named 'lm_head' in TinyForCausalLM", 0), 0u) << msg;
}

TEST(AutoWeightsLoader, MissingShardsAreReportedSortedAndComplete) {
  Tiny tiny;
  VectorWeightStream stream({Tiny::w("model.layers.0.q_proj.weight", arange2d(4, 4))});
  reset_load_counts(tiny.root);
  AutoWeightsLoader(tiny.root, tiny.mapping()).load(stream);
  auto msg = error_of([&] { check_all_initialized(tiny.root); });
  EXPECT_EQ(msg, "Some weights are not initialized from checkpoints: model.layers.0.norm.weight, "
                 "model.layers.0.qkv_proj.weight");
}

TEST(AutoWeightsLoader, ShapeErrorNamesTensorFileAndParameter) {
  Tiny tiny;
  auto msg = error_of([&] {
    AutoWeightsLoader(tiny.root, tiny.mapping()).load_one(Tiny::w("model.layers.0.norm.weight", at::ones({5})));
  });
  EXPECT_NE(msg.find("test.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'model.layers.0.norm.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[5]"), std::string::npos) << msg;
}

// ------------------------------------------------------------ ModelConfig

TEST(ModelConfig, MissingKeyAndWrongTypeNameFileAndKey) {
  auto cfg = ModelConfig::parse(R"({"hidden_size": "big", "rope_scaling": {"factor": "x"}})", "/m/config.json");
  EXPECT_EQ(error_of([&] { cfg.get_int("num_hidden_layers"); }),
            "/m/config.json: missing required key 'num_hidden_layers'");
  EXPECT_EQ(error_of([&] { cfg.get_int("hidden_size"); }),
            "/m/config.json: key 'hidden_size' must be an integer, got string");
  EXPECT_EQ(error_of([&] { cfg.get_object("rope_scaling").get_double("factor"); }),
            "/m/config.json: key 'rope_scaling.factor' must be a number, got string");
  EXPECT_EQ(cfg.get_int("absent", 7), 7);
}

TEST(ModelConfig, InvalidJsonNamesTheFile) {
  auto msg = error_of([] { ModelConfig::parse("{\"a\": ", "/m/config.json"); });
  EXPECT_EQ(msg.rfind("/m/config.json: invalid JSON", 0), 0u) << msg;
}

}  // namespace
}  // namespace loadkit
