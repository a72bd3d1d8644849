#pragma once
/// \file
/// Element-wise activations chosen by their transformers name (`ACT2FN`), for
/// configs that name one (`activation_function`, `hidden_act`).

#include <ATen/core/Tensor.h>

#include <string>
#include <string_view>

#include "loadkit/model_config.h"

namespace loadkit {

using ActivationFn = at::Tensor (*)(const at::Tensor&);

/// The activation `config[key]` names, `fallback` when the key is absent:
/// gelu (erf); gelu_new, gelu_fast, gelu_pytorch_tanh (tanh approximation);
/// quick_gelu; relu; silu, swish. Any other name is an Input error naming the
/// file, the key and the names supported.
ActivationFn activation(const ModelConfig& config, std::string_view key, const std::string& fallback);

/// For models whose reference implementation has one activation only (vLLM's Llama MLP and
/// experts: silu): the activation `config[key]` names when it is `only` (absent: `only`), else
/// an Input error "<file>: <key> '<name>' is not supported (want <only>)".
ActivationFn activation_only(const ModelConfig& config, std::string_view key, const std::string& only);

/// SiLU (x · sigmoid(x)): what gated MLPs use when their config names no activation (MoE experts).
at::Tensor silu(const at::Tensor& x);

/// The activation called `name` (read from `config[key]` by the caller, e.g. after a
/// model-specific rewrite of a legacy value); errors as above.
ActivationFn activation_named(const ModelConfig& config, std::string_view key, const std::string& name);

}  // namespace loadkit
