#pragma once
/// \file
/// Rotary position embedding with the scaling schemes of transformers' `rope_type`.
///
/// Reads both config spellings: `rope_theta` + `rope_scaling` (most hub
/// checkpoints) and transformers 5's `rope_parameters`.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>

#include "loadkit/model_config.h"
#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

struct RopeParameters {
  double theta = 10000.0;
  std::string type = "default";  ///< default, linear, llama3, longrope
  ModelConfig scaling;           ///< the scaling object (empty for default), for type-specific keys
};

/// Rope settings of `config`; `default_theta` when it names none.
RopeParameters rope_parameters(const ModelConfig& config, double default_theta = 10000.0);

/// YaRN's magnitude correction for a context stretched by `scale`:
/// 0.1 · mscale · ln(scale) + 1, or 1 when scale ≤ 1 (transformers' / DeepSeek's `yarn_get_mscale`).
double yarn_mscale(double scale, double mscale = 1.0);

class RotaryEmbedding : public Module {
 public:
  /// Rotates the first `rotary_dim` of `head_size` dims; neox style rotates halves, GPT-J style pairs.
  RotaryEmbedding(int64_t head_size, int64_t rotary_dim, const RopeParameters& rope, const ModelContext& ctx,
                  bool neox_style = true);
  /// q [n, heads, head_size], k [n, kv_heads, head_size], positions [n] → rotated q, k.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& positions, const at::Tensor& q,
                                            const at::Tensor& k) const;

 private:
  at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const;
  int64_t head_size_, rotary_dim_;
  bool neox_style_;
  double attention_scaling_ = 1.0;
  /// longrope: sequences longer than this (original_max_position_embeddings) use "long_inv_freq"; 0 = none.
  int64_t long_context_after_ = 0;
};

}  // namespace loadkit
