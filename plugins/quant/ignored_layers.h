#pragma once
// Layers a pre-quantized checkpoint leaves in 16 bits, as its quantization_config lists them, and
// the rules vLLM matches layer names against that list with:
//   fp8 (`ignored_layers`, `modules_to_not_convert`): a layer is skipped when its name is an entry
//     (quant_utils.is_layer_skipped); a FusedMoE layer when an entry naming experts contains the
//     layer's name (`model.layers.1.mlp.experts.0.up_proj` skips `model.layers.1.mlp.experts`);
//   compressed-tensors (`ignore`): an entry is a name, or `re:<pattern>` matched from the start of
//     the name (Python's re.match); a FusedMoE layer is judged by its first expert's gate, up and
//     down projections (`<layer>.0.gate_proj`, ...), as vLLM's CompressedTensorsMoEMethod does.
// A fused layer (qkv_proj, gate_up_proj) is skipped when its parts are; some parts but not all is
// an Input error naming the layer and the config file, as vLLM refuses it (one tensor, one method).

#include <regex>
#include <string>
#include <vector>

namespace loadkit {
struct LayerPrefix;
}

namespace loadkit::quant {

class IgnoredLayers {
 public:
  enum class Rules { Fp8, CompressedTensors };
  /// `where`: the config file and key the entries come from, for messages. Input error naming
  /// the entry for a `re:` pattern that does not compile.
  IgnoredLayers(std::vector<std::string> entries, Rules rules, std::string where);
  IgnoredLayers() = default;

  /// Whether linear layer `layer` stays unquantized (false for an unnamed layer).
  bool skips_linear(const LayerPrefix& layer) const;
  /// Whether the routed experts of FusedMoE layer `layer` stay unquantized.
  bool skips_experts(const LayerPrefix& layer) const;

 private:
  bool matches(const std::string& name) const;
  /// Whether every one of `parts` is skipped (false for none); Input error when they disagree.
  bool all_or_none(const std::string& layer, const std::vector<std::string>& parts) const;

  std::vector<std::string> names_;
  std::vector<std::regex> patterns_;
  Rules rules_ = Rules::Fp8;
  std::string where_;
};

}  // namespace loadkit::quant
