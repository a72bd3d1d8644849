#include "loadkit/layers/sparse_moe.h"

#include <ATen/ATen.h>

#include "loadkit/layers/activation.h"
#include "loadkit/layers/linear.h"

namespace loadkit {

namespace {

/// The router's context: float32 and never quantized when asked, else the model's without quantization.
ModelContext router_context(const ModelContext& ctx, bool float32) {
  ModelContext out = ctx;
  if (float32) out.dtype = at::kFloat;
  out.quant = nullptr;
  return out;
}

}  // namespace

SparseMoEBlock::SparseMoEBlock(const SparseMoESpec& spec, const ModelContext& ctx)
    : FeedForwardBlock(spec.type_name),
      router_in_float32_(spec.router_in_float32),
      corrected_(spec.experts.score_correction_bias) {
  const FusedMoEOptions& o = spec.experts;
  gate_ = &add_module("gate", std::make_shared<ReplicatedLinear>(o.hidden_size, o.num_experts,
                                                                 router_context(ctx, router_in_float32_),
                                                                 LinearOptions{.quantize = false}));
  // vLLM's name and dtype: the router's float32 `e_score_correction_bias` [experts]
  // (checkpoint "mlp.gate.e_score_correction_bias"), read by the experts' routing only.
  if (o.score_correction_bias)
    gate_->add_parameter("e_score_correction_bias", at::empty({o.num_experts}, ctx.options().dtype(at::kFloat)));
  experts_ = &add_module("experts", std::make_shared<FusedMoE>(o, ctx));
  if (spec.shared_intermediate_size > 0)
    shared_ = &add_module("shared_experts", std::make_shared<GatedMLP>(spec.shared_type_name, o.hidden_size,
                                                                       spec.shared_intermediate_size, silu, ctx));
}

at::Tensor SparseMoEBlock::forward(const at::Tensor& x) {
  at::Tensor router_logits =
      router_in_float32_ ? at::linear(x.to(at::kFloat), gate_->param("weight").data) : gate_->forward(x);
  at::Tensor out = experts_->forward(
      x, router_logits, corrected_ ? gate_->param("e_score_correction_bias").data : at::Tensor());
  return shared_ ? out + shared_->forward(x) : out;
}

std::vector<ExpertParam> moe_expert_params(int64_t num_experts) {
  std::vector<ExpertParam> rules = make_expert_params_mapping("gate_proj", "down_proj", "up_proj", num_experts);
  rules.push_back({"experts.w13_weight", "experts.gate_up_proj", {"w13"}});
  rules.push_back({"experts.w2_weight", "experts.down_proj", {"w2"}});
  return rules;
}

}  // namespace loadkit
