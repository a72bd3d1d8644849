#pragma once
/// \file
/// The root of a model tree, as a plugin builds it.

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <set>
#include <string>

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

/// Builds a model, with parameters allocated on `ctx.device` in `ctx.dtype`
/// (contents undefined until loaded). Throws `loadkit::Error` on a config it
/// cannot serve, naming the key.
using ArchitectureFactory = std::function<std::shared_ptr<CausalLM>(const ModelContext& ctx)>;

}  // namespace loadkit
