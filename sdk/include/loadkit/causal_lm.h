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
/// (contents undefined until loaded), in load format (see quant_method.h).
///
/// Called once per load of an architecture the plugin registered, on the
/// loading thread, after the checkpoint's headers were validated and before
/// any weight is read; loads of other models may run on other threads at the
/// same time. `ctx` is valid during the call only.
///
/// Throws `loadkit::Error` on a config it cannot serve: `Input` naming the
/// config file and the key (check every size before dividing by it,
/// multiplying with it or allocating from it), `Usage` for a tensor-parallel
/// size it cannot split by. Other exceptions follow plugin.h's rules. Never
/// returns null.
///
/// What the host does with the model: records every parameter's load format
/// right after this returns, then streams the checkpoint through
/// `load_weights` — on a fresh load and again on every reload, with each
/// parameter's `loader` wrapped by the host, so a model writes weights through
/// its parameters' loaders only, never into `data` behind them — and calls
/// `process_weights_after_loading` on every module. It calls `forward`,
/// `load_weights` and processing from one thread at a time, and destroys the
/// model (last reference dropped) on any thread.
using ArchitectureFactory = std::function<std::shared_ptr<CausalLM>(const ModelContext& ctx)>;

}  // namespace loadkit
