// Per-layer quantization methods (quant_method.h, assign_quant_methods): a layer learns its
// name only when its parent adds it to the tree, after the layer built its parameters with the
// method most layers get. Once the model is whole, each quantizable layer is asked for again by
// name, and rebuilt where the answer differs (a checkpoint that leaves that layer 16-bit).

#include <map>
#include <string>
#include <vector>

#include "loadkit/causal_lm.h"
#include "loadkit/layers/fused_moe.h"
#include "loadkit/layers/linear.h"
#include "loadkit/quant_method.h"

namespace loadkit {

namespace {

/// `module` with its last component replaced by `leaf` (vLLM: prefix.replace(proj_name, shard_name)).
std::string sibling(const std::string& module, const std::string& leaf) {
  const size_t dot = module.rfind('.');
  return dot == std::string::npos ? leaf : module.substr(0, dot + 1) + leaf;
}

std::string without_dot(const std::string& s) { return !s.empty() && s.front() == '.' ? s.substr(1) : s; }

/// The checkpoint names of a fused layer's parts, in part order, from the stacked weight
/// mapping (".qkv_proj" <- ".q_proj" shard q, ...); empty for a layer that is not fused.
std::vector<std::string> part_names(LinearBase& layer, const std::string& name, const WeightMapping& mapping) {
  const size_t count = layer.output_parts().size();
  if (count < 2) return {};
  const std::string leaf = name.substr(name.rfind('.') + 1);
  std::map<size_t, std::string> parts;
  for (const StackedParam& rule : mapping.stacked) {
    if (without_dot(rule.param_name) != leaf) continue;
    const size_t part = layer.part_of(rule.shard);
    if (part < count) parts.emplace(part, sibling(name, without_dot(rule.weight_name)));
  }
  if (parts.size() != count) return {};  // fused in the checkpoint too (GPT-2's c_attn): one name
  std::vector<std::string> out;
  for (auto& [part, part_name] : parts) out.push_back(std::move(part_name));
  return out;
}

}  // namespace

void assign_quant_methods(CausalLM& model, const ModelContext& ctx) {
  if (!ctx.quant) return;
  const WeightMapping mapping = model.weight_mapping();
  for (const auto& [name, module] : model.named_modules()) {
    if (auto* linear = dynamic_cast<LinearBase*>(module)) {
      if (linear->quantizable()) linear->use_method(ctx.quant->linear_method({name, part_names(*linear, name, mapping)}));
    } else if (auto* moe = dynamic_cast<FusedMoE*>(module)) {
      if (moe->options().quantize) moe->use_method(ctx.quant->moe_method({name, {}}));
    }
  }
}

}  // namespace loadkit
