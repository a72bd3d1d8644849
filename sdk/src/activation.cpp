#include "loadkit/layers/activation.h"

#include <ATen/ATen.h>

#include <utility>

#include "loadkit/error.h"

namespace loadkit {

namespace {

at::Tensor gelu_erf(const at::Tensor& x) { return at::gelu(x); }
// transformers' gelu_new and gelu_fast write the tanh formula out; it is the same function.
at::Tensor gelu_tanh(const at::Tensor& x) { return at::gelu(x, "tanh"); }
at::Tensor quick_gelu(const at::Tensor& x) { return x * at::sigmoid(1.702 * x); }
at::Tensor relu(const at::Tensor& x) { return at::relu(x); }
constexpr std::pair<std::string_view, ActivationFn> kActivations[] = {
    {"gelu", gelu_erf},       {"gelu_new", gelu_tanh}, {"gelu_fast", gelu_tanh}, {"gelu_pytorch_tanh", gelu_tanh},
    {"quick_gelu", quick_gelu}, {"relu", relu},        {"silu", silu},           {"swish", silu},
};

}  // namespace

at::Tensor silu(const at::Tensor& x) { return at::silu(x); }

ActivationFn activation(const ModelConfig& config, std::string_view key, const std::string& fallback) {
  return activation_named(config, key, config.get_string(key, fallback));
}

ActivationFn activation_only(const ModelConfig& config, std::string_view key, const std::string& only) {
  const std::string name = config.get_string(key, only);
  if (name != only) fail(ErrorKind::Input, config.origin(), ": ", key, " '", name, "' is not supported (want ", only, ")");
  return activation_named(config, key, name);
}

ActivationFn activation_named(const ModelConfig& config, std::string_view key, const std::string& name) {
  std::string known;
  for (const auto& [n, fn] : kActivations) {
    if (n == name) return fn;
    known += cat(known.empty() ? "" : ", ", n);
  }
  fail(ErrorKind::Input, config.origin(), ": ", key, " '", name, "' is not supported (want one of ", known, ")");
}

}  // namespace loadkit
