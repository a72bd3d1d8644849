#pragma once
/// \file
/// What every Llama-like decoder reads from `config.json`, validated before any
/// arithmetic uses it (through ConfigReader, config_reader.h):
///
///   vocab_size, hidden_size, intermediate_size, num_hidden_layers,
///   num_attention_heads          positive integers
///   num_key_value_heads          positive (default: num_attention_heads), divides num_attention_heads
///   head_dim                     positive; absent: hidden_size / num_attention_heads, exactly
///   q/k/v/o and MLP weights      their element counts fit 64 bits and this machine's memory
///   <norm eps key>, tie_word_embeddings, rope_theta / rope_scaling / rope_parameters
///
/// A plugin reads its own keys through the same reader (`reader`), so its
/// constraints are stated the same way.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "loadkit/config_reader.h"
#include "loadkit/decoder_only_lm.h"
#include "loadkit/layers/activation.h"
#include "loadkit/layers/decoder_blocks.h"
#include "loadkit/layers/rotary.h"
#include "loadkit/model_context.h"

namespace loadkit {

struct DecoderConfig {
  /// Defaults that differ between families.
  struct Defaults {
    std::string norm_eps_key = "rms_norm_eps";
    double norm_eps = 1e-6;
    bool tie_word_embeddings = false;
  };

  DecoderConfig(ConfigReader& reader, const ModelContext& ctx, const Defaults& defaults);
  explicit DecoderConfig(ConfigReader& reader, const ModelContext& ctx) : DecoderConfig(reader, ctx, Defaults{}) {}

  int64_t vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim;
  double norm_eps;
  bool tie_word_embeddings;
  RopeParameters rope;

  /// head_dim x `factor` (config key 'partial_rotary_factor'): an even number of rotary
  /// dims in 2..head_dim, or an Input error naming the key.
  int64_t partial_rotary_dim(const ConfigReader& reader, double factor) const;
  /// Sizes and rope of the self-attention; the caller adds biases, windows, scales.
  SelfAttentionSpec attention() const;
  /// The skeleton's spec with these sizes and a final norm of `norm` kind.
  DecoderSpec decoder(std::string type_name, std::string model_type_name,
                      NormSpec::Kind norm = NormSpec::Kind::RMS) const;
  /// A pre-norm layer spec of these sizes (norm of `norm` kind, this epsilon).
  DecoderLayerSpec layer(std::string type_name, NormSpec::Kind norm = NormSpec::Kind::RMS) const;
};

/// What every GPT-2-style decoder (GPT-2, GPTBigCode) reads, in transformers' spellings
/// or the generic ones: n_embd | hidden_size, n_layer | num_hidden_layers, n_head |
/// num_attention_heads (dividing n_embd), n_inner (null: 4 x n_embd), n_positions |
/// max_position_embeddings, vocab_size, layer_norm_epsilon, tie_word_embeddings (default
/// true), activation_function; add_cross_attention (an encoder-decoder) is refused.
struct Gpt2DecoderConfig {
  Gpt2DecoderConfig(ConfigReader& reader, const ModelContext& ctx, const std::string& default_activation);

  int64_t hidden_size, num_layers, num_heads, head_dim, inner_size, max_positions, vocab_size;
  double layer_norm_eps;
  bool tie_word_embeddings;
  ActivationFn activation;

  /// The skeleton's spec under GPT-2's names (gpt2_names), LayerNorm, learned positions.
  DecoderSpec decoder(std::string type_name, std::string model_type_name) const;
  /// A pre-norm block (ln_1, attn, ln_2, mlp) of these sizes.
  DecoderLayerSpec layer(std::string type_name) const;
};

/// The GPT-2 family's checkpoint names: names without `transformer.` (older hub
/// checkpoints) gain it, causal-mask buffers (`h.N.attn.bias`, `attn.masked_bias`)
/// are skipped, `lm_head.` too when tied.
WeightMapping gpt2_weight_mapping(bool tie_word_embeddings);

/// Per-layer sliding windows (0 = full attention): with `layer_types` in the config (transformers
/// 5), `window` on the layers it marks "sliding_attention" (it must list num_hidden_layers
/// entries); without it, on the layers `sliding` picks (the family's older rule).
std::vector<int64_t> sliding_windows(const ConfigReader& reader, int64_t num_layers, int64_t window,
                                     const std::function<bool(int64_t layer)>& sliding);

/// Qwen2's and Qwen3's rule: windows only with `use_sliding_window`, of `sliding_window`, on the
/// layers layer_types marks (older configs: from `max_window_layers` on).
std::vector<int64_t> qwen_sliding_windows(ConfigReader& reader, int64_t num_layers);

}  // namespace loadkit
