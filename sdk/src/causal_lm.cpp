#include "loadkit/causal_lm.h"

#include <algorithm>

#include "loadkit/missing_tensors.h"

namespace loadkit {

namespace {

/// `name` with `from` replaced by `to`, or "" when `from` does not occur in it.
std::string replaced(const std::string& name, const std::string& from, const std::string& to) {
  const auto pos = name.find(from);
  if (pos == std::string::npos) return "";
  std::string out = name;
  out.replace(pos, from.size(), to);
  return out;
}

}  // namespace

std::vector<std::string> missing_tensors_of(const std::string& param, const std::vector<std::string>& received_shards,
                                            const WeightMapping& mapping) {
  const auto received = [&](const ShardId& shard) {
    return std::find(received_shards.begin(), received_shards.end(), shard.str()) != received_shards.end();
  };
  std::vector<std::string> missing;
  // An expert's tensors are named per expert, as hub checkpoints store them (the stacked
  // transformers-5 rules have no expert index and are one alternative spelling of them all).
  for (const auto& rule : mapping.experts)
    if (rule.shard.expert >= 0 && !received(rule.shard))
      if (auto tensor = replaced(param, rule.param_name, rule.weight_name); !tensor.empty())
        missing.push_back(std::move(tensor));
  // A fused parameter that got some of its shards lacks the others; one that got none may come
  // fused in the checkpoint too (Phi3's qkv_proj), so it keeps its own name.
  if (missing.empty() && !received_shards.empty())
    for (const auto& rule : mapping.stacked)
      if (!received(rule.shard))
        if (auto tensor = replaced(param, rule.param_name, rule.weight_name); !tensor.empty())
          missing.push_back(std::move(tensor));
  if (missing.empty()) missing.push_back(param);
  return missing;
}

std::vector<std::string> missing_checkpoint_tensors(const CausalLM& model) {
  const WeightMapping mapping = model.weight_mapping();
  std::vector<std::string> missing;
  for (const auto& [name, p] : model.named_parameters()) {
    if (p->loaded_numel >= p->expected_load_numel) continue;
    for (auto& tensor : missing_tensors_of(name, p->loaded_shards, mapping)) missing.push_back(std::move(tensor));
  }
  std::sort(missing.begin(), missing.end());
  return missing;
}

void check_all_initialized(const CausalLM& model) { fail_if_missing(missing_checkpoint_tensors(model)); }

}  // namespace loadkit
