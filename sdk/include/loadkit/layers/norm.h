#pragma once
/// \file
/// Normalisation layers, computed in float32 as transformers does.

#include <ATen/core/Tensor.h>

#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

/// weight * x / rms(x). With `unit_offset` (Gemma) the scale is (1 + weight),
/// applied in float32 before casting back, as Gemma's reference does.
class RMSNorm : public Module {
 public:
  RMSNorm(int64_t hidden_size, double eps, const ModelContext& ctx, bool unit_offset = false);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  double eps_;
  bool unit_offset_;
};

/// at::layer_norm with weight and (optionally) bias.
class LayerNorm : public Module {
 public:
  LayerNorm(int64_t hidden_size, double eps, const ModelContext& ctx, bool bias = true);
  at::Tensor forward(const at::Tensor& x) const;

 private:
  int64_t hidden_size_;
  double eps_;
};

}  // namespace loadkit
