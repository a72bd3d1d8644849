#pragma once
/// \file
/// The decoder-only language model every Llama-like plugin is:
///
///   <root>                 e.g. LlamaForCausalLM
///     model                e.g. LlamaModel
///       embed_tokens       VocabParallelEmbedding (vocabulary padded to 64, split over ranks)
///       [wpe]              learned absolute positions (GPT-2), when asked for
///       layers.N           the plugin's DecoderLayer, one per layer, from its factory
///       norm               the final norm (NormSpec)
///     lm_head              ParallelLMHead, or the embedding itself when tied
///
/// with vLLM's names by default (`DecoderNames` renames them for GPT-2's
/// `transformer.wte/wpe/h/ln_f`), and the default Llama weight mapping
/// (`decoder_weight_mapping`): q/k/v_proj → qkv_proj, gate/up_proj →
/// gate_up_proj, rotary caches skipped, `lm_head.` skipped when tied.
///
/// An architecture is then its config reader, its layer and its differences:
///
/// \code
///   auto model = std::make_shared<DecoderOnlyLM>(
///       DecoderSpec{.type_name = "LlamaForCausalLM", .model_type_name = "LlamaModel",
///                   .vocab_size = cfg.vocab_size, .hidden_size = cfg.hidden_size,
///                   .num_layers = cfg.num_layers, .tie_word_embeddings = cfg.tie_word_embeddings,
///                   .final_norm = {NormSpec::Kind::RMS, cfg.norm_eps}},
///       ctx, [&](int64_t i) { return std::make_shared<PreNormDecoderLayer>(...); });
/// \endcode
///
/// What differs beyond data (Gemma's scaled embeddings, soft-capped logits, an
/// extra weight rule) is a subclass overriding `embed`, `compute_logits` or
/// `weight_mapping`.
///
/// Memory: the embedding (and an untied head) are checked against this
/// machine's memory before they are allocated, and after each layer is built
/// the layers still to come are too (their count times the size of the last
/// one); a config that could never fit fails with exit 3 naming the key, not
/// with the allocator's message.

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>

#include "loadkit/causal_lm.h"
#include "loadkit/layers/decoder_blocks.h"
#include "loadkit/layers/embedding.h"
#include "loadkit/layers/norm.h"

namespace loadkit {

/// Module names of the skeleton; the defaults are vLLM's Llama names.
struct DecoderNames {
  std::string model = "model", embed = "embed_tokens", positions = "wpe", layers = "layers", norm = "norm";
};
/// GPT-2's: transformer.wte, transformer.wpe, transformer.h.N, transformer.ln_f.
DecoderNames gpt2_names();

struct DecoderSpec {
  std::string type_name;        ///< the root module, e.g. "LlamaForCausalLM"
  std::string model_type_name;  ///< the `model` module, e.g. "LlamaModel"
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0;
  bool tie_word_embeddings = false;
  NormSpec final_norm{};
  DecoderNames names{};
  /// > 0: learned absolute position embeddings (GPT-2's `wpe`) for this many positions,
  /// replicated on every rank; longer inputs are an Input error naming `positions_key`.
  int64_t learned_positions = 0;
  std::string positions_key = "n_positions";
  /// > 0: the model has routed experts (SparseMoEBlock); their checkpoint rules
  /// (moe_expert_params) join the weight mapping.
  int64_t num_experts = 0;
  /// The config keys messages name for the vocabulary, hidden and layer sizes.
  std::string vocab_key = "vocab_size", hidden_key = "hidden_size", layers_key = "num_hidden_layers";
};

/// Builds layer `index` (0-based) of the model; called once per layer, in order.
using LayerFactory = std::function<std::shared_ptr<DecoderLayer>(int64_t index)>;

class DecoderOnlyLM : public CausalLM {
 public:
  DecoderOnlyLM(DecoderSpec spec, const ModelContext& ctx, const LayerFactory& make_layer);

  /// positions 0..n-1 → embed → layers → final norm → compute_logits.
  at::Tensor forward(const at::Tensor& token_ids) override;
  int64_t vocab_size() const override { return spec_.vocab_size; }
  /// `decoder_weight_mapping(tie_word_embeddings, num_experts)`; subclasses add their rules to it.
  WeightMapping weight_mapping() const override;

 protected:
  /// Token (and learned position) embeddings of `token_ids` [n] → [n, hidden].
  virtual at::Tensor embed(const at::Tensor& token_ids, const at::Tensor& positions);
  /// Final hidden states [n, hidden] → logits [n, vocab_size].
  virtual at::Tensor compute_logits(const at::Tensor& hidden);

  const DecoderSpec& spec() const { return spec_; }
  VocabParallelEmbedding& embed_tokens() { return *embed_; }
  ParallelLMHead& lm_head() { return *lm_head_; }

 private:
  DecoderSpec spec_;
  VocabParallelEmbedding* embed_ = nullptr;
  Module* positions_ = nullptr;
  std::vector<DecoderLayer*> layers_;
  Norm* norm_ = nullptr;
  ParallelLMHead* lm_head_ = nullptr;
};

/// The weight mapping of a Llama-like checkpoint: stacked q/k/v and gate/up
/// (decoder_stacked_params), rotary caches some exports carry skipped
/// (`rotary_emb.inv_freq`, `cos_cached`, `sin_cached`), `lm_head.` skipped
/// when the embeddings are tied (the head is the embedding), and with
/// `num_experts` > 0 the expert rules of sparse_moe.h.
WeightMapping decoder_weight_mapping(bool tie_word_embeddings, int64_t num_experts = 0);

}  // namespace loadkit
