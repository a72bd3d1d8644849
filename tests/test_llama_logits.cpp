// The Llama family against transformers: logits through the C++ API and the
// CLI, on the CPU and (on the GPU machine) on CUDA.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "loadkit/causal_lm.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "tensor_io.h"
#include "device_skip.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

const std::vector<std::string> kLlamaFixtures = {
    "llama_fp32_gqa_sharded", "llama_legacy_name",  "aquila_model",     "aquila_causal_lm",
    "llama_fp32_llama3_tied", "llama_fp32_llama3_legacy_config",      "llama_bf16_mqa",
    "llama_bf16_gqa_tied",    "mistral_fp32_window", "internlm_fp32_bias",  "llama_fp32_gqa_b",
    "llama_bf16_gqa_tied_b",
};


at::Tensor reference_logits(const Fixture& f) {
  for (auto& [name, t] : load_tensors(f.reference))
    if (name == "logits") return t;
  throw std::runtime_error("reference without logits: " + f.reference);
}

/// DESIGN's tolerances: fp32 max abs diff ≤ 1e-4; 16-bit cosine ≥ 0.999 per row and argmax agreement.
void expect_close(const at::Tensor& ours, const at::Tensor& ref, const std::string& dtype) {
  ASSERT_EQ(ours.sizes(), ref.sizes());
  ASSERT_EQ(ours.scalar_type(), at::kFloat);
  if (dtype == "float32") {
    EXPECT_LE((ours - ref).abs().max().item<double>(), 1e-4);
  } else {
    at::Tensor cos = at::cosine_similarity(ours, ref, 1);
    EXPECT_GE(cos.min().item<double>(), 0.999);
    EXPECT_TRUE(at::equal(ours.argmax(-1), ref.argmax(-1)));
  }
}

std::unique_ptr<LoadedModel> load(const std::string& dir, const std::string& device = "cpu",
                                  const std::string& dtype = "auto", const std::string& format = "auto") {
  static Registry registry({plugin_dir()});
  LoadOptions options;
  options.model_dir = dir;
  options.device = device;
  options.dtype = dtype;
  options.load_format = format;
  return LoadedModel::load(options, registry);
}

class LlamaLogits : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {
 protected:
  const Fixture& fx() const { return fixture(std::get<0>(GetParam())); }
  const std::string& device() const { return std::get<1>(GetParam()); }
};

TEST_P(LlamaLogits, ApiMatchesTransformers) {
  SKIP_WITHOUT(device());
  auto model = load(fx().dir, device());
  expect_close(model->logits(fx().tokens), reference_logits(fx()), fx().dtype);
}

TEST_P(LlamaLogits, CliMatchesTransformers) {
  SKIP_WITHOUT(device());
  TempDir tmp;
  const std::string out = (tmp / "logits.safetensors").string();
  auto r = run_cli({"logits", "--model", fx().dir, "--tokens", fx().tokens_arg(), "--out", out, "--device", device(),
                    "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto tensors = load_tensors(out);
  ASSERT_EQ(tensors.size(), 1u);
  EXPECT_EQ(tensors[0].first, "logits");
  expect_close(tensors[0].second, reference_logits(fx()), fx().dtype);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LlamaLogits,
                         ::testing::Combine(::testing::ValuesIn(kLlamaFixtures), ::testing::Values("cpu", "cuda")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(LlamaFixtures, EveryGeneratedFixtureIsCovered) {
  for (const auto& f : fixtures())
    EXPECT_NE(std::find(kLlamaFixtures.begin(), kLlamaFixtures.end(), f.name), kLlamaFixtures.end()) << f.name;
}

TEST(LlamaModel, ParameterNamesAreVllms) {
  auto model = load(fixture("llama_fp32_gqa_sharded").dir);
  std::set<std::string> names;
  for (auto& [name, p] : model->model().named_parameters()) names.insert(name);
  std::set<std::string> expected{"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"};
  for (int i = 0; i < 3; ++i) {
    const std::string l = "model.layers." + std::to_string(i) + ".";
    for (const char* p : {"self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                          "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"})
      expected.insert(l + p);
  }
  EXPECT_EQ(names, expected);
  // 1000 vocabulary rows padded to 1024, zero beyond the vocabulary.
  auto& embed = model->model().find_child("model")->find_child("embed_tokens")->param("weight");
  EXPECT_EQ(embed.data.size(0), 1024);
  EXPECT_EQ(embed.data.narrow(0, 1000, 24).abs().sum().item<double>(), 0.0);
}

TEST(LlamaModel, TiedEmbeddingsShareOneParameter) {
  auto model = load(fixture("llama_fp32_llama3_tied").dir);
  auto* root = &model->model();
  EXPECT_EQ(&root->find_child("lm_head")->param("weight"),
            &root->find_child("model")->find_child("embed_tokens")->param("weight"));
  for (auto& [name, p] : root->named_parameters()) EXPECT_NE(name, "lm_head.weight");
}

TEST(LlamaModel, Fp32CheckpointLoadsAsBfloat16) {
  const auto& f = fixture("llama_fp32_gqa_sharded");
  auto model = load(f.dir, "cpu", "bfloat16");
  EXPECT_EQ(model->report().dtype, "bfloat16");
  expect_close(model->logits(f.tokens), reference_logits(f), "bfloat16");
}

TEST(LlamaModel, DummyFormatReadsNothing) {
  auto model = load(fixture("llama_fp32_gqa_sharded").dir, "cpu", "auto", "dummy");
  EXPECT_EQ(model->report().bytes, 0u);
  at::Tensor logits = model->logits({1, 2, 3});
  EXPECT_TRUE(at::isfinite(logits).all().item<bool>());
  EXPECT_FALSE(at::equal(logits, reference_logits(fixture("llama_fp32_gqa_sharded")).narrow(0, 0, 3)));
}

TEST(LlamaModel, LoadReportHasTheContractFields) {
  const auto& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  auto r = run_cli({"load", "--model", f.dir, "--report", (tmp / "r.json").string(), "--plugin-dir", plugin_dir()});
  ASSERT_EQ(r.code, 0) << r.err;
  auto report = nlohmann::json::parse(read_bytes(tmp / "r.json"));
  uint64_t bytes = 0;  // tensor bytes on disk, from the headers
  for (const auto& e : fs::directory_iterator(f.dir))
    if (e.path().extension() == ".safetensors") {
      const auto raw = RawSafetensors::read(e.path());
      for (auto& [name, t] : raw.header.items())
        if (name != "__metadata__") bytes += t["data_offsets"][1].get<uint64_t>() - t["data_offsets"][0].get<uint64_t>();
    }
  EXPECT_EQ(report.at("bytes").get<uint64_t>(), bytes);
  EXPECT_GT(report.at("seconds").get<double>(), 0.0);
  EXPECT_GT(report.at("gb_per_s").get<double>(), 0.0);
  EXPECT_TRUE(report.contains("peak_extra_device_bytes"));
  EXPECT_TRUE(report.at("pointers_stable").get<bool>());
  EXPECT_GT(report.at("layers_processed").get<int>(), 0);
  EXPECT_EQ(report.at("layers_delayed").get<int>(), 0);
}

TEST(LlamaModel, CudaLoadReportsPeakExtraMemory) {
  SKIP_WITHOUT(std::string("cuda"));
  auto model = load(fixture("llama_fp32_gqa_sharded").dir, "cuda");
  ASSERT_TRUE(model->report().peak_extra_device_bytes.has_value());
  EXPECT_EQ(model->context().device.type(), c10::DeviceType::CUDA);
}

}  // namespace
}  // namespace loadkit::test
