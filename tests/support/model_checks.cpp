#include "model_checks.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "loadkit/causal_lm.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "tensor_io.h"

namespace loadkit::test {

Registry& build_registry() {
  static Registry r({plugin_dir()});
  return r;
}

std::unique_ptr<LoadedModel> load_model(const std::string& dir, const std::string& device, const std::string& quant,
                                        const std::string& dtype, const std::string& format) {
  LoadOptions o;
  o.model_dir = dir;
  o.device = device;
  o.quantization = quant;
  o.dtype = dtype;
  o.load_format = format;
  return LoadedModel::load(o, build_registry());
}

at::Tensor reference_logits(const Fixture& f) {
  for (auto& [name, t] : load_tensors(f.reference))
    if (name == "logits") return t;
  throw std::runtime_error("no logits in " + f.reference);
}

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

std::map<std::string, at::Tensor> kernel_state(LoadedModel& m) {
  std::map<std::string, at::Tensor> out;
  for (auto& [name, module] : m.model().named_modules()) {
    for (auto& [p, param] : module->parameters()) out[name.empty() ? p : name + "." + p] = param->data.clone();
    for (auto& [b, buf] : module->buffers()) out[name.empty() ? b : name + "." + b] = buf.clone();
  }
  return out;
}

void expect_identical(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    ASSERT_NE(it, b.end()) << name;
    ASSERT_EQ(t.scalar_type(), it->second.scalar_type()) << name;
    ASSERT_EQ(t.sizes(), it->second.sizes()) << name;
    // Bit-identical: compare the raw bytes (works for fp8, and for NaN).
    EXPECT_TRUE(at::equal(t.contiguous().view(at::kByte), it->second.contiguous().view(at::kByte))) << name;
  }
}

}  // namespace loadkit::test
