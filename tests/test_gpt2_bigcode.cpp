// GPT-2 and GPTBigCode store q, k and v fused in one c_attn tensor (GPT-2 as a Conv1D [in, out];
// GPTBigCode without multi_query grouped per head). Loaded through each plugin's weight mapping at
// tensor parallel size 2, every rank must hold exactly what separate q, k and v tensors give it:
// the same as a QKVParallelLinear loaded shard by shard, and the same as slicing q, k, v by hand.
// The model trees are built with tp_rank/tp_size and no process group: nothing runs forward.
// Also the SDK mechanism they rely on (WeightMapping::layouts), and the bad inputs particular
// to these layouts: each one Input error naming what is wrong.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/layers/linear.h"
#include "loadkit/model_context.h"
#include "loadkit/runtime/registry.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr int kTp = 2;
constexpr int64_t kHidden = 8, kHeads = 4, kHeadDim = 2;

ModelContext context(const std::string& config_json, int rank) {
  ModelContext ctx;
  ctx.config = ModelConfig::parse(config_json, "test-config.json");
  ctx.tp_rank = rank;
  ctx.tp_size = kTp;
  return ctx;
}

std::string config(const std::string& extra) {
  return R"({"n_embd": 8, "n_head": 4, "n_layer": 1, "n_positions": 16, "vocab_size": 100)" + extra + "}";
}

/// Distinct values everywhere, so that any misplaced row shows.
at::Tensor rows(int64_t n, int64_t cols, double offset) {
  return at::arange(n * cols, at::kFloat).view({n, cols}) + offset;
}

at::Tensor param_of(CausalLM& model, const std::string& name) {
  for (const auto& [n, p] : model.named_parameters())
    if (n == name) return p->data;
  ADD_FAILURE() << "no parameter " << name;
  return {};
}

/// The rank's c_attn weight and bias after loading `weights` (checkpoint names and tensors).
std::pair<at::Tensor, at::Tensor> load_c_attn(const Registry& registry, const std::string& arch,
                                              const std::string& config_json, int rank,
                                              std::vector<NamedWeight> weights) {
  auto model = registry.create_model(arch, context(config_json, rank));
  VectorWeightStream stream(std::move(weights));
  auto loaded = model->load_weights(stream);
  EXPECT_TRUE(loaded.count("transformer.h.0.attn.c_attn.weight"));
  return {param_of(*model, "transformer.h.0.attn.c_attn.weight"), param_of(*model, "transformer.h.0.attn.c_attn.bias")};
}

/// What a QKVParallelLinear of rank `rank` holds after loading q, k and v as separate tensors.
at::Tensor separate_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kv_heads, int rank) {
  ModelContext ctx = context(config(""), rank);
  QKVParallelLinear layer(kHidden, kHeadDim, kHeads, kv_heads, ctx);
  auto& w = layer.param("weight");
  w.loader(w, q, {"q"});
  w.loader(w, k, {"k"});
  w.loader(w, v, {"v"});
  return w.data;
}

/// This rank's heads cut by hand: q split over the ranks; k and v split too, or whole when there is one kv head.
at::Tensor sliced(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int rank) {
  auto part = [rank](const at::Tensor& t) {
    const int64_t per_rank = t.size(0) / kTp;
    return t.size(0) == kHeadDim ? t : t.narrow(0, rank * per_rank, per_rank);
  };
  return at::cat({part(q), part(k), part(v)});
}

TEST(FusedQkvShards, Gpt2Conv1DcAttnGivesEachRankItsQkvShards) {
  Registry registry({plugin_dir()});
  at::Tensor q = rows(kHidden, kHidden, 0), k = rows(kHidden, kHidden, 1000), v = rows(kHidden, kHidden, 2000);
  at::Tensor bq = at::arange(kHidden, at::kFloat), bk = bq + 100, bv = bq + 200;
  at::Tensor conv1d = at::cat({q, k, v}).t().contiguous();  // [in, 3 * hidden], as GPT-2 checkpoints store it
  for (int rank = 0; rank < kTp; ++rank) {
    // The old hub spelling (no transformer. prefix) and a mask buffer that must be skipped.
    auto [w, b] = load_c_attn(registry, "GPT2LMHeadModel", config(""), rank,
                              {{"h.0.attn.c_attn.weight", conv1d, "test.safetensors"},
                               {"h.0.attn.c_attn.bias", at::cat({bq, bk, bv}), "test.safetensors"},
                               {"h.0.attn.bias", at::ones({1, 1, 16, 16}), "test.safetensors"}});
    EXPECT_TRUE(at::equal(w, separate_qkv(q, k, v, kHeads, rank))) << "rank " << rank;
    EXPECT_TRUE(at::equal(w, sliced(q, k, v, rank))) << "rank " << rank;
    EXPECT_TRUE(at::equal(b, sliced(bq.unsqueeze(1), bk.unsqueeze(1), bv.unsqueeze(1), rank).squeeze(1)));
  }
}

TEST(FusedQkvShards, BigCodeMultiQueryGivesEveryRankTheOneKvHead) {
  Registry registry({plugin_dir()});
  at::Tensor q = rows(kHidden, kHidden, 0), k = rows(kHeadDim, kHidden, 1000), v = rows(kHeadDim, kHidden, 2000);
  for (int rank = 0; rank < kTp; ++rank) {
    auto [w, b] = load_c_attn(registry, "GPTBigCodeForCausalLM", config(R"(, "multi_query": true)"), rank,
                              {{"transformer.h.0.attn.c_attn.weight", at::cat({q, k, v}), "test.safetensors"},
                               {"transformer.h.0.attn.c_attn.bias", at::arange(kHidden + 2 * kHeadDim, at::kFloat),
                                "test.safetensors"}});
    EXPECT_TRUE(at::equal(w, separate_qkv(q, k, v, 1, rank))) << "rank " << rank;
    EXPECT_TRUE(at::equal(w, sliced(q, k, v, rank))) << "rank " << rank;
    EXPECT_EQ(b.size(0), kHidden / kTp + 2 * kHeadDim);
  }
}

TEST(FusedQkvShards, BigCodeMultiHeadRegroupsPerHeadQkvIntoEachRanksShards) {
  Registry registry({plugin_dir()});
  at::Tensor q = rows(kHidden, kHidden, 0), k = rows(kHidden, kHidden, 1000), v = rows(kHidden, kHidden, 2000);
  // transformers' layout without multi_query: per head [q_h | k_h | v_h].
  auto per_head = [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    auto heads = [](const at::Tensor& t) { return t.reshape({kHeads, kHeadDim, -1}); };
    return at::stack({heads(a), heads(b), heads(c)}, 1).reshape({3 * kHeads * kHeadDim, -1});
  };
  at::Tensor bq = at::arange(kHidden, at::kFloat).unsqueeze(1), bk = bq + 100, bv = bq + 200;
  for (int rank = 0; rank < kTp; ++rank) {
    auto [w, b] = load_c_attn(registry, "GPTBigCodeForCausalLM", config(R"(, "multi_query": false)"), rank,
                              {{"transformer.h.0.attn.c_attn.weight", per_head(q, k, v), "test.safetensors"},
                               {"transformer.h.0.attn.c_attn.bias", per_head(bq, bk, bv).squeeze(1),
                                "test.safetensors"}});
    EXPECT_TRUE(at::equal(w, separate_qkv(q, k, v, kHeads, rank))) << "rank " << rank;
    EXPECT_TRUE(at::equal(w, sliced(q, k, v, rank))) << "rank " << rank;
    EXPECT_TRUE(at::equal(b, sliced(bq, bk, bv, rank).squeeze(1))) << "rank " << rank;
  }
}

template <class F>
std::string input_error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

// ------------------------------------- SDK: checkpoint layouts (WeightMapping::layouts)

TEST(TensorLayouts, TransposedSuffixLoadsTheTransposeAndLeavesOtherTensorsAlone) {
  ModelContext ctx = context(config(""), 0);
  ctx.tp_size = 1;
  Module root("Root");
  root.add_module("fc", std::make_shared<ColumnParallelLinear>(3, 4, ctx, LinearOptions{.bias = true}));
  root.add_module("proj", std::make_shared<ColumnParallelLinear>(3, 4, ctx));
  WeightMapping mapping;
  mapping.layouts = {transposed("fc.weight")};  // proj.weight does not end with it
  AutoWeightsLoader loader(root, mapping);
  at::Tensor stored = rows(3, 4, 0);  // [in, out]
  loader.load_one({"fc.weight", stored, "test.safetensors"});
  loader.load_one({"fc.bias", at::arange(4, at::kFloat), "test.safetensors"});
  loader.load_one({"proj.weight", rows(4, 3, 50), "test.safetensors"});
  EXPECT_TRUE(at::equal(root.find_child("fc")->param("weight").data, stored.t()));
  EXPECT_TRUE(at::equal(root.find_child("fc")->param("bias").data, at::arange(4, at::kFloat)));
  EXPECT_TRUE(at::equal(root.find_child("proj")->param("weight").data, rows(4, 3, 50)));
}

TEST(TensorLayouts, ConversionErrorNamesFileTensorAndParameter) {
  ModelContext ctx = context(config(""), 0);
  ctx.tp_size = 1;
  Module root("Root");
  root.add_module("fc", std::make_shared<ColumnParallelLinear>(3, 4, ctx));
  WeightMapping mapping;
  mapping.layouts = {transposed("fc.weight")};
  auto msg = input_error_of(
      [&] { AutoWeightsLoader(root, mapping).load_one({"fc.weight", at::zeros({12}), "a.safetensors"}); });
  EXPECT_NE(msg.find("a.safetensors: tensor 'fc.weight' -> parameter 'fc.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("2-D"), std::string::npos) << msg;
}

// ------------------------------------------------------------ bad inputs

std::shared_ptr<CausalLM> single_rank(const Registry& registry, const std::string& arch, const std::string& json) {
  ModelContext ctx;
  ctx.config = ModelConfig::parse(json, "test-config.json");
  return registry.create_model(arch, ctx);
}

void load(CausalLM& model, const std::string& name, const at::Tensor& tensor) {
  VectorWeightStream stream({{name, tensor, "test.safetensors"}});
  model.load_weights(stream);
}

TEST(Gpt2BigCodeInputs, UnknownActivationNamesFileKeyAndValue) {
  Registry registry({plugin_dir()});
  for (const char* arch : {"GPT2LMHeadModel", "GPTBigCodeForCausalLM"}) {
    auto msg = input_error_of([&] { single_rank(registry, arch, config(R"(, "activation_function": "gelu_wobbly")")); });
    EXPECT_NE(msg.find("test-config.json"), std::string::npos) << msg;
    EXPECT_NE(msg.find("activation_function 'gelu_wobbly'"), std::string::npos) << msg;
  }
}

TEST(Gpt2BigCodeInputs, Conv1DWeightThatIsNotTwoDimensionalNamesTheTensor) {
  Registry registry({plugin_dir()});
  auto model = single_rank(registry, "GPT2LMHeadModel", config(""));
  auto msg = input_error_of([&] { load(*model, "h.0.mlp.c_fc.weight", at::zeros({8, 32, 1})); });
  EXPECT_NE(msg.find("'h.0.mlp.c_fc.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("2-D"), std::string::npos) << msg;
}

TEST(Gpt2BigCodeInputs, Conv1DWeightStoredOutInIsAShapeError) {
  // A checkpoint that already holds [out, in] (not GPT-2's Conv1D layout) must not load silently.
  Registry registry({plugin_dir()});
  auto model = single_rank(registry, "GPT2LMHeadModel", config(""));
  auto msg = input_error_of([&] { load(*model, "transformer.h.0.mlp.c_fc.weight", at::zeros({32, 8})); });
  EXPECT_NE(msg.find("'transformer.h.0.mlp.c_fc.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[8, 32]"), std::string::npos) << msg;
}

TEST(Gpt2BigCodeInputs, PerHeadCAttnOfWrongSizeNamesTheTensor) {
  Registry registry({plugin_dir()});
  auto model = single_rank(registry, "GPTBigCodeForCausalLM", config(R"(, "multi_query": false)"));
  // The multi-query size (hidden + 2 * head_dim rows) in a multi-head checkpoint.
  auto msg = input_error_of([&] { load(*model, "transformer.h.0.attn.c_attn.weight", at::zeros({12, 8})); });
  EXPECT_NE(msg.find("'transformer.h.0.attn.c_attn.weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[12, 8]"), std::string::npos) << msg;
}

TEST(Gpt2BigCodeInputs, MoreTokensThanLearnedPositionsIsAnError) {
  Registry registry({plugin_dir()});
  for (const char* arch : {"GPT2LMHeadModel", "GPTBigCodeForCausalLM"}) {
    auto model = single_rank(registry, arch, config(""));
    auto msg = input_error_of([&] { model->forward(at::zeros({17}, at::kLong)); });
    EXPECT_NE(msg.find("17 tokens"), std::string::npos) << msg;
    EXPECT_NE(msg.find("16"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace loadkit::test
