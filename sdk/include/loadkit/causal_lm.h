#pragma once
/// \file
/// The root of a model tree, as a plugin builds it.

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

class CausalLM : public Module {
 public:
  using Module::Module;

  /// Logits of one sequence at positions 0..n-1, no KV cache: token ids [n]
  /// (int64, on the model's device) → [n, vocab_size()] in any float dtype.
  virtual at::Tensor forward(const at::Tensor& token_ids) = 0;

  /// The unpadded vocabulary size.
  virtual int64_t vocab_size() const = 0;

  /// How checkpoint names map onto this tree (stacked parameters, renames, skips).
  virtual WeightMapping weight_mapping() const { return {}; }

  /// Loads a stream of checkpoint tensors; returns the parameters that got data.
  /// Default: `AutoWeightsLoader(*this, weight_mapping())`.
  virtual std::set<std::string> load_weights(WeightStream& weights) {
    return AutoWeightsLoader(*this, weight_mapping()).load(weights);
  }
};

/// The checkpoint tensors `model` still lacks after a load (counters reset before
/// it), sorted: every parameter `uninitialized_parameters` names, except that a
/// fused parameter is named by the checkpoint tensors its weight mapping fills
/// it from and that did not arrive — an expert's
/// `model.layers.1.mlp.experts.3.gate_proj.weight` rather than
/// `model.layers.1.mlp.experts.w13_weight`, and, when some of its shards came,
/// `self_attn.k_proj.weight` rather than `self_attn.qkv_proj.weight`.
std::vector<std::string> missing_checkpoint_tensors(const CausalLM& model);

/// `check_all_initialized` for a whole model: the error names what
/// `missing_checkpoint_tensors` does. (Overload resolution picks it for a
/// `CausalLM`; the `Module` overload in auto_weights_loader.h names parameters.)
void check_all_initialized(const CausalLM& model);

/// Builds a model, with parameters allocated on `ctx.device` in `ctx.dtype`
/// (contents undefined until loaded). Throws `loadkit::Error` on a config it
/// cannot serve, naming the key.
using ArchitectureFactory = std::function<std::shared_ptr<CausalLM>(const ModelContext& ctx)>;

}  // namespace loadkit
