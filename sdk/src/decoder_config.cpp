#include "loadkit/decoder_config.h"

#include "loadkit/error.h"

namespace loadkit {

DecoderConfig::DecoderConfig(ConfigReader& r, const ModelContext& ctx, const Defaults& defaults)
    : vocab_size(r.positive("vocab_size")),
      hidden_size(r.positive("hidden_size")),
      intermediate_size(r.positive("intermediate_size")),
      num_layers(r.positive("num_hidden_layers")),
      num_heads(r.positive("num_attention_heads")),
      num_kv_heads(r.positive("num_key_value_heads", num_heads)),
      head_dim(r.has("head_dim") ? r.positive("head_dim")
                                 : r.quotient("head_dim", "hidden_size", "num_attention_heads")),
      norm_eps(r.config().get_double(defaults.norm_eps_key, defaults.norm_eps)),
      tie_word_embeddings(r.config().get_bool("tie_word_embeddings", defaults.tie_word_embeddings)),
      rope(rope_parameters(r.config())) {
  r.divides("num_key_value_heads", "num_attention_heads");
  // Per rank, the largest weights of a layer: q (and o) and the MLP's gate and up.
  const auto element = static_cast<int64_t>(c10::elementSize(ctx.dtype));
  r.allocatable({"num_attention_heads", "head_dim", "hidden_size"}, element, 1, ctx.tp_size);
  r.allocatable({"intermediate_size", "hidden_size"}, element, 2, ctx.tp_size);
  // Every layer holds at least its o_proj: a layer count no memory could hold is refused here,
  // before anything is sized by it (per-layer tables included).
  r.allocatable({"num_hidden_layers", "num_attention_heads", "head_dim", "hidden_size"}, element, 1, ctx.tp_size);
}

int64_t DecoderConfig::partial_rotary_dim(const ConfigReader& r, double factor) const {
  const auto dims = static_cast<int64_t>(static_cast<double>(head_dim) * factor);
  if (dims < 2 || dims > head_dim || dims % 2 != 0)
    fail(ErrorKind::Input, r.origin(), ": key 'partial_rotary_factor' (", factor, ") gives ", dims,
         " rotary dims of head_dim ", head_dim, " (want an even number in 2..head_dim)");
  return dims;
}

SelfAttentionSpec DecoderConfig::attention() const {
  return {.hidden_size = hidden_size, .num_heads = num_heads, .num_kv_heads = num_kv_heads, .head_dim = head_dim,
          .rope = rope};
}

DecoderSpec DecoderConfig::decoder(std::string type_name, std::string model_type_name, NormSpec::Kind norm) const {
  return {.type_name = std::move(type_name), .model_type_name = std::move(model_type_name), .vocab_size = vocab_size,
          .hidden_size = hidden_size, .num_layers = num_layers, .tie_word_embeddings = tie_word_embeddings,
          .final_norm = {norm, norm_eps}};
}

DecoderLayerSpec DecoderConfig::layer(std::string type_name, NormSpec::Kind norm) const {
  return {.type_name = std::move(type_name), .hidden_size = hidden_size, .norm = {norm, norm_eps}};
}

Gpt2DecoderConfig::Gpt2DecoderConfig(ConfigReader& r, const ModelContext& ctx, const std::string& default_activation)
    : hidden_size(r.positive_of({"n_embd", "hidden_size"})),
      num_layers(r.positive_of({"n_layer", "num_hidden_layers"})),
      num_heads(r.positive_of({"n_head", "num_attention_heads"})),
      head_dim(r.quotient("head_dim", "n_embd", "n_head")),
      inner_size(r.positive("n_inner", r.product({"n_embd"}, 4))),  // null means 4 * hidden
      max_positions(r.positive_of({"n_positions", "max_position_embeddings"})),
      vocab_size(r.positive("vocab_size")),
      layer_norm_eps(r.config().get_double("layer_norm_epsilon", 1e-5)),
      tie_word_embeddings(r.config().get_bool("tie_word_embeddings", true)),
      activation(loadkit::activation(r.config(), "activation_function", default_activation)) {
  if (r.config().get_bool("add_cross_attention", false))
    fail(ErrorKind::Input, r.origin(), ": add_cross_attention is not supported (decoder-only models only)");
  const auto element = static_cast<int64_t>(c10::elementSize(ctx.dtype));
  r.allocatable({"n_embd", "n_embd"}, element, 3, ctx.tp_size);  // c_attn
  r.allocatable({"n_inner", "n_embd"}, element, 1, ctx.tp_size);  // c_fc
}

DecoderSpec Gpt2DecoderConfig::decoder(std::string type_name, std::string model_type_name) const {
  return {.type_name = std::move(type_name), .model_type_name = std::move(model_type_name), .vocab_size = vocab_size,
          .hidden_size = hidden_size, .num_layers = num_layers, .tie_word_embeddings = tie_word_embeddings,
          .final_norm = {NormSpec::Kind::Layer, layer_norm_eps}, .names = gpt2_names(),
          .learned_positions = max_positions, .hidden_key = "n_embd", .layers_key = "n_layer"};
}

DecoderLayerSpec Gpt2DecoderConfig::layer(std::string type_name) const {
  return {.type_name = std::move(type_name), .hidden_size = hidden_size, .norm = {NormSpec::Kind::Layer, layer_norm_eps},
          .names = gpt2_layer_names()};
}

WeightMapping gpt2_weight_mapping(bool tie_word_embeddings) {
  WeightMapping m;
  // First matching rule wins: names already under transformer. or lm_head. stay, the rest gain the prefix.
  m.mapper.prefixes = {{"transformer.", "transformer."}, {"lm_head.", "lm_head."}, {"", "transformer."}};
  // Causal-mask buffers (h.N.attn.bias); ".attn.bias" never matches "c_attn.bias".
  m.skip_substrs = {".attn.bias", ".attn.masked_bias"};
  if (tie_word_embeddings) m.skip_prefixes = {"lm_head."};
  return m;
}

std::vector<int64_t> sliding_windows(const ConfigReader& r, int64_t num_layers, int64_t window,
                                     const std::function<bool(int64_t)>& sliding) {
  std::vector<int64_t> out(static_cast<size_t>(num_layers), 0);
  if (window <= 0) return out;
  if (r.has("layer_types")) {
    const auto types = r.config().get_strings("layer_types");
    if (static_cast<int64_t>(types.size()) != num_layers)
      fail(ErrorKind::Input, r.origin(), ": key 'layer_types' has ", types.size(), " entries, want one per layer (",
           num_layers, ", key 'num_hidden_layers')");
    for (int64_t i = 0; i < num_layers; ++i)
      if (types[i] == "sliding_attention") out[i] = window;
    return out;
  }
  for (int64_t i = 0; i < num_layers; ++i)
    if (sliding(i)) out[i] = window;
  return out;
}

std::vector<int64_t> qwen_sliding_windows(ConfigReader& r, int64_t num_layers) {
  const bool use = r.config().get_bool("use_sliding_window", false);
  const int64_t first = use ? r.non_negative("max_window_layers", num_layers) : 0;
  return sliding_windows(r, num_layers, use ? r.non_negative("sliding_window", 0) : 0,
                         [first](int64_t i) { return i >= first; });
}

}  // namespace loadkit
