#include "loadkit/decoder_only_lm.h"

#include <ATen/ATen.h>

#include "loadkit/config_reader.h"
#include "loadkit/error.h"
#include "loadkit/layers/sparse_moe.h"

namespace loadkit {

namespace {

/// Learned absolute positions: a plain embedding, whole on every rank (vLLM's nn.Embedding wpe).
class PositionEmbedding : public Module {
 public:
  PositionEmbedding(int64_t max_positions, int64_t dim, const ModelContext& ctx) : Module("Embedding") {
    add_parameter("weight", at::empty({max_positions, dim}, ctx.options()));
  }
  at::Tensor forward(const at::Tensor& positions) const { return at::embedding(param("weight").data, positions); }
};

long double parameter_bytes(const Module& module) {
  long double bytes = 0;
  for (const auto& [name, p] : module.named_parameters())
    bytes += static_cast<long double>(p->data.numel()) * static_cast<long double>(p->data.element_size());
  return bytes;
}

void require_positive(const ModelContext& ctx, const std::string& key, int64_t value) {
  if (value < 1) fail(ErrorKind::Input, ctx.config.origin(), ": key '", key, "' must be a positive integer, got ", value);
}

}  // namespace

DecoderNames gpt2_names() {
  return {.model = "transformer", .embed = "wte", .positions = "wpe", .layers = "h", .norm = "ln_f"};
}

DecoderOnlyLM::DecoderOnlyLM(DecoderSpec spec, const ModelContext& ctx, const LayerFactory& make_layer)
    : CausalLM(spec.type_name), spec_(std::move(spec)) {
  const DecoderSpec& s = spec_;
  const std::string& origin = ctx.config.origin();
  // Plugins read these through a ConfigReader already; the skeleton allocates from them, so it
  // holds the line itself too.
  require_positive(ctx, s.vocab_key, s.vocab_size);
  require_positive(ctx, s.hidden_key, s.hidden_size);
  require_positive(ctx, s.layers_key, s.num_layers);
  const auto element_size = static_cast<long double>(c10::elementSize(ctx.dtype));
  const long double embedding_bytes = static_cast<long double>(s.vocab_size) * static_cast<long double>(s.hidden_size) *
                                      element_size * (s.tie_word_embeddings ? 1 : 2) / ctx.tp_size;
  check_fits_in_memory(origin, cat("'", s.vocab_key, "' x '", s.hidden_key, "' (", s.vocab_size, " x ",
                                   s.hidden_size, ")"),
                       embedding_bytes);
  if (s.learned_positions > 0)
    check_fits_in_memory(origin, cat("'", s.positions_key, "' x '", s.hidden_key, "' (", s.learned_positions,
                                     " x ", s.hidden_size, ")"),
                         static_cast<long double>(s.learned_positions) * s.hidden_size * element_size);

  auto& model = add_module(s.names.model, std::make_shared<Module>(s.model_type_name));
  embed_ = &model.add_module(s.names.embed, std::make_shared<VocabParallelEmbedding>(s.vocab_size, s.hidden_size, ctx));
  if (s.learned_positions > 0)
    positions_ = &model.add_module(s.names.positions,
                                   std::make_shared<PositionEmbedding>(s.learned_positions, s.hidden_size, ctx));
  auto& layers = model.add_module(s.names.layers, std::make_shared<ModuleList>());
  long double built = parameter_bytes(*this);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    DecoderLayer& layer = layers.append(make_layer(i));
    layers_.push_back(&layer);
    // The layers still to come, at the size of this one: refused before they are allocated.
    const long double bytes = parameter_bytes(layer);
    built += bytes;
    check_fits_in_memory(origin, cat("'", s.layers_key, "' (", s.num_layers, ") layers of ", human_bytes(bytes)),
                         built + bytes * static_cast<long double>(s.num_layers - i - 1));
  }
  norm_ = &model.add_module(s.names.norm, make_norm(s.final_norm, s.hidden_size, ctx));
  lm_head_ = &add_module("lm_head", std::make_shared<ParallelLMHead>(s.vocab_size, s.hidden_size, ctx));
  if (s.tie_word_embeddings) lm_head_->tie_to(*embed_);
}

at::Tensor DecoderOnlyLM::forward(const at::Tensor& token_ids) {
  at::Tensor positions = at::arange(token_ids.size(0), token_ids.options());
  at::Tensor h = embed(token_ids, positions);
  for (DecoderLayer* layer : layers_) h = layer->forward(positions, h);
  return compute_logits(norm_->forward(h));
}

at::Tensor DecoderOnlyLM::embed(const at::Tensor& token_ids, const at::Tensor& positions) {
  at::Tensor h = embed_->forward(token_ids);
  if (!positions_) return h;
  if (token_ids.size(0) > spec_.learned_positions)
    fail(ErrorKind::Input, spec_.type_name, ": ", token_ids.size(0), " tokens exceed the model's ",
         spec_.learned_positions, " learned positions (", spec_.positions_key, ")");
  return h + static_cast<PositionEmbedding*>(positions_)->forward(positions);
}

at::Tensor DecoderOnlyLM::compute_logits(const at::Tensor& hidden) { return lm_head_->compute_logits(hidden); }

WeightMapping DecoderOnlyLM::weight_mapping() const {
  return decoder_weight_mapping(spec_.tie_word_embeddings, spec_.num_experts);
}

WeightMapping decoder_weight_mapping(bool tie_word_embeddings, int64_t num_experts) {
  WeightMapping m;
  m.stacked = decoder_stacked_params();
  if (num_experts > 0) m.experts = moe_expert_params(num_experts);
  m.skip_substrs = {"rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached"};
  if (tie_word_embeddings) m.skip_prefixes = {"lm_head."};
  return m;
}

}  // namespace loadkit
