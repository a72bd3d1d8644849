// What is particular to the Llama plugin: vLLM's parameter names, padded and
// tied embeddings, dtype conversion, the dummy format and the load report.
// Its logits against transformers are in test_architectures (tests/archs/llama.cpp).

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "loadkit/causal_lm.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "tensor_io.h"
#include "device_skip.h"
#include "model_checks.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

std::unique_ptr<LoadedModel> load(const std::string& dir, const std::string& device = "cpu",
                                  const std::string& dtype = "auto", const std::string& format = "auto") {
  return load_model(dir, device, "none", dtype, format);
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
