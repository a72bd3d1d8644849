#pragma once
/// \file
/// Dispatches checkpoint tensors to the parameters of a module tree.
///
/// A plugin declares how its checkpoint names map onto its tree as data — a
/// `WeightMapping` — and `AutoWeightsLoader` interprets it (vLLM's
/// `AutoWeightsLoader` plus the `stacked_params_mapping` loop every vLLM
/// model writes by hand). For each tensor, in order:
///   1. the name mapper renames it (prefix rules, then substring rules);
///   2. names matching `skip_prefixes` / `skip_substrs` are dropped;
///   3. the first expert rule whose `weight_name` occurs in the name and whose
///      renamed form is a parameter wins: its loader gets the rule's expert and shard;
///   4. then the first stacked rule whose `weight_name` occurs in the name and whose
///      renamed form is a parameter wins: its loader gets the rule's shard id;
///   5. otherwise the name itself must be a parameter, else
///      `There is no module or parameter named '<prefix>' in <ModuleType>`;
///   6. the first `layouts` rule whose suffix ends the (renamed) name converts
///      the tensor before the parameter's loader sees it.

#include <functional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "loadkit/module.h"
#include "loadkit/weights.h"

namespace loadkit {

/// Checkpoint name rewriting (vLLM's WeightsMapper): first matching prefix rule, then every substring rule.
struct NameMapper {
  std::vector<std::pair<std::string, std::string>> prefixes;    ///< {from, to}
  std::vector<std::pair<std::string, std::string>> substrings;  ///< {from, to}, all applied in order
  std::string apply(const std::string& name) const;
};

/// "`weight_name` in a checkpoint name is shard `shard` of parameter `param_name`".
struct StackedParam {
  std::string param_name;   ///< e.g. ".qkv_proj"
  std::string weight_name;  ///< e.g. ".q_proj"
  ShardId shard;            ///< e.g. {"q"}
};

/// "A checkpoint tensor whose (renamed) name ends with `suffix` is stored in another
/// layout than its parameter's loader takes": `convert` gives the loader's layout
/// (a view where it can), or throws `loadkit::Error` naming what is wrong with it.
struct TensorLayout {
  std::string suffix;  ///< e.g. ".c_fc.weight"
  std::function<at::Tensor(const at::Tensor&)> convert;
};

/// A 2-D checkpoint tensor stored [in, out] (GPT-2's Conv1D), loaded as its [out, in] transpose.
TensorLayout transposed(std::string suffix);

/// "`weight_name` (e.g. "experts.3.gate_proj.") is shard `shard.name` of expert
/// `shard.expert` of the stacked MoE parameter `param_name` + the rest of the
/// name" (vLLM's expert_params_mapping): "mlp.experts.3.gate_proj.weight" →
/// "mlp.experts.w13_weight", shard {"w1", 3}.
struct ExpertParam {
  std::string param_name;   ///< e.g. "experts.w13_"
  std::string weight_name;  ///< e.g. "experts.3.gate_proj."
  ShardId shard;            ///< e.g. {"w1", 3}
};

/// vLLM's `make_expert_params_mapping`: for each of `num_experts` experts,
/// `gate` → w13 shard "w1", `up` → w13 shard "w3", `down` → w2 shard "w2".
std::vector<ExpertParam> make_expert_params_mapping(const std::string& gate, const std::string& down,
                                                    const std::string& up, int64_t num_experts);

struct WeightMapping {
  NameMapper mapper;
  std::vector<StackedParam> stacked;
  std::vector<ExpertParam> experts;  ///< tried before `stacked` (an expert's "gate_proj" is no dense gate_proj)
  std::vector<std::string> skip_prefixes;  ///< e.g. "lm_head." when embeddings are tied
  std::vector<std::string> skip_substrs;   ///< e.g. "rotary_emb.inv_freq"
  /// Checkpoint layouts other than the loaders', first match by suffix (applied after renaming).
  std::vector<TensorLayout> layouts;
};

class AutoWeightsLoader {
 public:
  AutoWeightsLoader(Module& root, WeightMapping mapping);

  /// Loads every tensor of `weights`. Returns the qualified names of the
  /// parameters that received data. Errors name the tensor and its origin.
  std::set<std::string> load(WeightStream& weights);

  /// Loads one tensor; returns the parameter name it went to, or "" when skipped.
  std::string load_one(const NamedWeight& weight);

 private:
  struct Target {
    Parameter* param = nullptr;
    std::string name;
  };
  bool skipped(const std::string& name) const;
  /// Step 3's candidates for `name`, in rule order: the rules whose weight_name occurs in it.
  std::vector<size_t> expert_candidates(const std::string& name) const;
  /// Walks the tree; on failure returns no param and sets `error` when asked.
  Target resolve(const std::string& name, std::string* error) const;

  Module& root_;
  WeightMapping mapping_;
  /// Expert rules of the form "experts.<e>.<proj>." by weight_name (a model has 3 x E of them:
  /// a tensor's own "experts.<e>.<proj>." picks its rules by one lookup instead of a scan);
  /// any other expert rule is scanned.
  std::unordered_map<std::string, std::vector<size_t>> experts_by_name_;
  std::vector<size_t> experts_scanned_;
};

/// The parameters of `root` that received fewer elements than a complete
/// checkpoint writes (after a load with counters reset), sorted.
std::vector<std::string> uninitialized_parameters(const Module& root);

/// Resets `loaded_numel` of every parameter below `root`.
void reset_load_counts(Module& root);

/// Throws `Some weights are not initialized from checkpoints: <sorted names>` (Input)
/// when `uninitialized_parameters(root)` is not empty. For a whole model, the overload
/// in causal_lm.h names checkpoint tensors instead of fused parameters.
void check_all_initialized(const Module& root);

/// How many names a missing-weights error lists before "... and N more".
inline constexpr size_t kMissingNamesShown = 20;

/// The one place that words a missing-weights error: throws it (Input) naming
/// `missing`, sorted (the first kMissingNamesShown of them, then how many more),
/// unless it is empty.
void fail_if_missing(std::vector<std::string> missing);

}  // namespace loadkit
