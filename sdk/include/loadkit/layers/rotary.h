#pragma once
/// \file
/// Rotary position embedding with the scaling schemes of transformers' `rope_type`.
///
/// Reads the config spellings in use: `rope_theta` + `rope_scaling` (most hub
/// checkpoints), transformers 5's `rope_parameters`, and InternLM's own
/// `rotary: {"type": "origin" | "dynamic", "base": …, "scaling_factor": …}`.
///
/// `dynamic` (dynamic NTK) is plain RoPE for sequences up to
/// `max_position_embeddings`; a longer one rescales the base for its own
/// length L: base · (factor · L / max − (factor − 1))^(d / (d − 2)), as
/// transformers computes it (in float32) for each forward.
///
/// Every factor, length and base something is divided by or raised with is
/// checked first: an Input error naming the key, never a NaN or infinity.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>

#include "loadkit/model_config.h"
#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

struct RopeParameters {
  double theta = 10000.0;
  std::string type = "default";  ///< default, linear, dynamic, llama3, longrope, yarn
  ModelConfig scaling{};         ///< the scaling object (empty for default), for type-specific keys
  double dynamic_factor = 1.0;   ///< dynamic: the context stretch (`factor`; InternLM: `scaling_factor`)
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
  /// dynamic: the frequencies for a sequence of `seq_len` > max_position_embeddings.
  at::Tensor dynamic_inv_freq(int64_t seq_len) const;
  int64_t head_size_, rotary_dim_;
  bool neox_style_;
  double attention_scaling_ = 1.0;
  /// longrope: sequences longer than this (original_max_position_embeddings) use "long_inv_freq"; 0 = none.
  int64_t long_context_after_ = 0;
  /// dynamic: sequences longer than this (max_position_embeddings) rescale the base; 0 = none.
  int64_t dynamic_after_ = 0;
  double dynamic_factor_ = 1.0, theta_ = 10000.0;
};

}  // namespace loadkit
