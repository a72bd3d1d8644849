#pragma once
// What Qwen3 and Qwen3-MoE share: Llama's decoder plus q and k RMS-normalised per head
// (q_norm, k_norm, weights of size head_dim) after the projection and before the rotary
// embedding, an explicit head_dim (not hidden / heads), optional q/k/v/o bias, and
// sliding windows where use_sliding_window says so.

#include <loadkit/decoder_config.h>
#include <loadkit/layers/activation.h>

namespace qwen3 {

using namespace loadkit;

struct Qwen3Config : DecoderConfig {
  bool attention_bias;
  ActivationFn activation;
  std::vector<int64_t> sliding_window;  ///< per layer, 0 = full attention

  Qwen3Config(ConfigReader& r, const ModelContext& ctx)
      : DecoderConfig(r, ctx),
        attention_bias(r.config().get_bool("attention_bias", false)),
        activation(loadkit::activation(r.config(), "hidden_act", "silu")),
        sliding_window(qwen_sliding_windows(r, num_layers)) {}

  /// Qwen3Attention: the SDK's rotary self-attention with per-head q/k norms.
  std::shared_ptr<AttentionBlock> attention_block(const char* type_name, int64_t layer, const ModelContext& ctx) const {
    SelfAttentionSpec s = attention();
    s.qkv_bias = s.o_bias = attention_bias;
    s.attention.sliding_window = sliding_window[layer];
    s.qk_norm_eps = norm_eps;
    return std::make_shared<RotarySelfAttention>(type_name, s, ctx);
  }
};

}  // namespace qwen3
