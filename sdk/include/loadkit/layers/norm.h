#pragma once
/// \file
/// Normalisation layers, computed in float32 as transformers does.

#include <ATen/core/Tensor.h>

#include <memory>

#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

/// A normalisation over the last dimension; what a decoder layer or the skeleton's
/// final norm holds when the kind is the architecture's choice (NormSpec).
class Norm : public Module {
 public:
  using Module::Module;
  virtual at::Tensor forward(const at::Tensor& x) const = 0;
};

/// weight * x / rms(x). With `unit_offset` (Gemma) the scale is (1 + weight),
/// applied in float32 before casting back, as Gemma's reference does.
class RMSNorm : public Norm {
 public:
  RMSNorm(int64_t hidden_size, double eps, const ModelContext& ctx, bool unit_offset = false);
  at::Tensor forward(const at::Tensor& x) const override;

 private:
  double eps_;
  bool unit_offset_;
};

/// at::layer_norm with weight and (optionally) bias.
class LayerNorm : public Norm {
 public:
  LayerNorm(int64_t hidden_size, double eps, const ModelContext& ctx, bool bias = true);
  at::Tensor forward(const at::Tensor& x) const override;

 private:
  int64_t hidden_size_;
  double eps_;
};

/// Which normalisation an architecture uses, as data.
struct NormSpec {
  enum class Kind {
    RMS,            ///< RMSNorm (Llama, Qwen, Phi3, DeepSeek)
    RMSUnitOffset,  ///< RMSNorm scaled by (1 + weight) (Gemma)
    Layer,          ///< LayerNorm with bias (GPT-2, StarCoder2)
  };
  Kind kind = Kind::RMS;
  double eps = 1e-6;
};

/// A norm of `hidden_size` as `spec` says.
std::shared_ptr<Norm> make_norm(const NormSpec& spec, int64_t hidden_size, const ModelContext& ctx);

}  // namespace loadkit
