#include "loadkit/layers/norm.h"

#include <ATen/ATen.h>

namespace loadkit {

RMSNorm::RMSNorm(int64_t hidden_size, double eps, const ModelContext& ctx, bool unit_offset)
    : Norm("RMSNorm"), eps_(eps), unit_offset_(unit_offset) {
  add_parameter("weight", at::empty({hidden_size}, ctx.options()));
}

at::Tensor RMSNorm::forward(const at::Tensor& x) const {
  const at::Tensor& weight = param("weight").data;
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  if (unit_offset_) return (h * (weight.to(at::kFloat) + 1.0)).to(x.scalar_type());
  return weight * h.to(x.scalar_type());
}

LayerNorm::LayerNorm(int64_t hidden_size, double eps, const ModelContext& ctx, bool bias)
    : Norm("LayerNorm"), hidden_size_(hidden_size), eps_(eps) {
  add_parameter("weight", at::empty({hidden_size}, ctx.options()));
  if (bias) add_parameter("bias", at::empty({hidden_size}, ctx.options()));
}

at::Tensor LayerNorm::forward(const at::Tensor& x) const {
  at::Tensor bias;
  if (const Parameter* b = const_cast<LayerNorm*>(this)->find_param("bias")) bias = b->data;
  return at::layer_norm(x, {hidden_size_}, param("weight").data, bias, eps_);
}

std::shared_ptr<Norm> make_norm(const NormSpec& spec, int64_t hidden_size, const ModelContext& ctx) {
  switch (spec.kind) {
    case NormSpec::Kind::RMS: return std::make_shared<RMSNorm>(hidden_size, spec.eps, ctx);
    case NormSpec::Kind::RMSUnitOffset: return std::make_shared<RMSNorm>(hidden_size, spec.eps, ctx, true);
    case NormSpec::Kind::Layer: return std::make_shared<LayerNorm>(hidden_size, spec.eps, ctx);
  }
  return nullptr;  // unreachable: every kind is handled above
}

}  // namespace loadkit
