#include "loadkit/auto_weights_loader.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "loadkit/error.h"

namespace loadkit {

std::string NameMapper::apply(const std::string& name) const {
  std::string out = name;
  for (const auto& [from, to] : prefixes) {
    if (out.compare(0, from.size(), from) == 0) {
      out = to + out.substr(from.size());
      break;
    }
  }
  for (const auto& [from, to] : substrings) {
    if (auto pos = out.find(from); pos != std::string::npos) out.replace(pos, from.size(), to);
  }
  return out;
}

TensorLayout transposed(std::string suffix) {
  return {std::move(suffix), [](const at::Tensor& t) {
            if (t.dim() != 2) fail(ErrorKind::Input, "want a 2-D [in, out] tensor, got shape ", shape_str(t.sizes()));
            return t.t();
          }};
}

namespace {

constexpr std::string_view kExperts = "experts.";

/// The end of "experts.<e>.<proj>." starting at `pos` in `name` (two more dot-ended segments), or npos.
size_t expert_key_end(std::string_view name, size_t pos) {
  size_t end = pos + kExperts.size();
  for (int segment = 0; segment < 2; ++segment) {
    const size_t dot = name.find('.', end);
    if (dot == std::string_view::npos || dot == end) return std::string_view::npos;
    end = dot + 1;
  }
  return end;
}

}  // namespace

AutoWeightsLoader::AutoWeightsLoader(Module& root, WeightMapping mapping)
    : root_(root), mapping_(std::move(mapping)) {
  for (size_t r = 0; r < mapping_.experts.size(); ++r) {
    const std::string& w = mapping_.experts[r].weight_name;
    if (w.starts_with(kExperts) && expert_key_end(w, 0) == w.size()) {
      experts_by_name_[w].push_back(r);
    } else {
      experts_scanned_.push_back(r);
    }
  }
}

std::vector<size_t> AutoWeightsLoader::expert_candidates(const std::string& name) const {
  std::vector<size_t> rules;
  for (size_t pos = name.find(kExperts); pos != std::string::npos; pos = name.find(kExperts, pos + 1)) {
    const size_t end = expert_key_end(name, pos);
    if (end == std::string::npos) continue;
    if (auto it = experts_by_name_.find(name.substr(pos, end - pos)); it != experts_by_name_.end())
      rules.insert(rules.end(), it->second.begin(), it->second.end());
  }
  for (size_t r : experts_scanned_)
    if (name.find(mapping_.experts[r].weight_name) != std::string::npos) rules.push_back(r);
  std::sort(rules.begin(), rules.end());
  rules.erase(std::unique(rules.begin(), rules.end()), rules.end());
  return rules;
}

bool AutoWeightsLoader::skipped(const std::string& name) const {
  for (const auto& p : mapping_.skip_prefixes)
    if (name.compare(0, p.size(), p) == 0) return true;
  for (const auto& s : mapping_.skip_substrs)
    if (name.find(s) != std::string::npos) return true;
  return false;
}

AutoWeightsLoader::Target AutoWeightsLoader::resolve(const std::string& name, std::string* error) const {
  Module* module = &root_;
  size_t pos = 0;
  for (;;) {
    if (Parameter* p = module->find_param(std::string_view(name).substr(pos))) return {p, name};
    size_t dot = name.find('.', pos);
    Module* child = dot == std::string::npos ? nullptr : module->find_child(std::string_view(name).substr(pos, dot - pos));
    if (!child) {
      if (error)
        *error = cat("There is no module or parameter named '", name.substr(0, dot), "' in ", module->type_name());
      return {};
    }
    module = child;
    pos = dot + 1;
  }
}

namespace {

int64_t call_loader(Parameter& param, const NamedWeight& weight, const std::string& param_name, const ShardId& shard,
                    const TensorLayout* layout) {
  auto context = [&] {
    return cat(weight.origin, ": tensor '", weight.name, "' -> parameter '", param_name, "'",
               shard.empty() ? std::string() : cat(" (shard ", shard.str(), ")"), ": ");
  };
  if (param.data.is_floating_point() != weight.tensor.is_floating_point())
    throw Error(ErrorKind::Input, context() + cat("dtype ", c10::toString(weight.tensor.scalar_type()),
                                                  " cannot load into a ", c10::toString(param.data.scalar_type()),
                                                  " parameter"));
  try {
    if (layout) return param.loader(param, layout->convert(weight.tensor), shard);
    return param.loader(param, weight.tensor, shard);
  } catch (const Error& e) {
    throw Error(e.kind(), context() + e.what());
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    throw Error(ErrorKind::Input, context() + msg.substr(0, msg.find('\n')));
  }
}

}  // namespace

std::string AutoWeightsLoader::load_one(const NamedWeight& weight) {
  const std::string name = mapping_.mapper.apply(weight.name);
  if (skipped(name)) return "";

  Target target;
  ShardId shard;
  for (size_t r : expert_candidates(name)) {
    const ExpertParam& rule = mapping_.experts[r];
    auto pos = name.find(rule.weight_name);
    if (pos == std::string::npos) continue;
    std::string candidate = name;
    candidate.replace(pos, rule.weight_name.size(), rule.param_name);
    target = resolve(candidate, nullptr);
    if (target.param) {
      shard = rule.shard;
      break;
    }
  }
  for (const auto& rule : mapping_.stacked) {
    if (target.param) break;
    auto pos = name.find(rule.weight_name);
    if (pos == std::string::npos) continue;
    std::string candidate = name;
    candidate.replace(pos, rule.weight_name.size(), rule.param_name);
    target = resolve(candidate, nullptr);
    if (target.param) {
      shard = rule.shard;
      break;
    }
  }
  if (!target.param) {
    std::string error;
    target = resolve(name, &error);
    if (!target.param)
      fail(ErrorKind::Input, error, " (checkpoint tensor '", weight.name, "' from ", weight.origin, ")");
  }
  Parameter& param = *target.param;
  const TensorLayout* layout = nullptr;
  for (const auto& rule : mapping_.layouts)
    if (std::string_view(name).ends_with(rule.suffix)) {
      layout = &rule;
      break;
    }
  int64_t written = call_loader(param, weight, target.name, shard, layout);
  param.loaded_numel = std::min<int64_t>(param.data.numel(), param.loaded_numel + written);
  std::string shard_name = shard.str();
  if (std::find(param.loaded_shards.begin(), param.loaded_shards.end(), shard_name) == param.loaded_shards.end())
    param.loaded_shards.push_back(std::move(shard_name));
  return target.name;
}

std::set<std::string> AutoWeightsLoader::load(WeightStream& weights) {
  std::set<std::string> loaded;
  NamedWeight weight;
  while (weights.next(weight)) {
    std::string target = load_one(weight);
    if (!target.empty()) loaded.insert(std::move(target));
  }
  return loaded;
}

std::vector<ExpertParam> make_expert_params_mapping(const std::string& gate, const std::string& down,
                                                    const std::string& up, int64_t num_experts) {
  std::vector<ExpertParam> rules;
  rules.reserve(static_cast<size_t>(3 * num_experts));
  for (int64_t e = 0; e < num_experts; ++e) {
    const std::string prefix = cat("experts.", e, ".");
    rules.push_back({"experts.w13_", prefix + gate + ".", {"w1", e}});
    rules.push_back({"experts.w2_", prefix + down + ".", {"w2", e}});
    rules.push_back({"experts.w13_", prefix + up + ".", {"w3", e}});
  }
  return rules;
}

void reset_load_counts(Module& root) {
  for (auto& [name, p] : root.named_parameters()) {
    p->loaded_numel = 0;
    p->loaded_shards.clear();
  }
}

std::vector<std::string> uninitialized_parameters(const Module& root) {
  std::vector<std::string> missing;
  for (const auto& [name, p] : root.named_parameters())
    if (p->loaded_numel < p->expected_load_numel) missing.push_back(name);
  std::sort(missing.begin(), missing.end());
  return missing;
}

void fail_if_missing(std::vector<std::string> missing) {
  if (missing.empty()) return;
  std::sort(missing.begin(), missing.end());
  // One line a person reads: a config with 100000 layers over a 2-layer checkpoint misses
  // millions of names, and the first ones say what is wrong as well as all of them would.
  std::string list;
  const size_t shown = std::min(missing.size(), kMissingNamesShown);
  for (size_t i = 0; i < shown; ++i) list += (i ? ", " : "") + missing[i];
  if (missing.size() > shown) list += cat(", ... and ", missing.size() - shown, " more");
  fail(ErrorKind::Input, "Some weights are not initialized from checkpoints: ", list);
}

void check_all_initialized(const Module& root) { fail_if_missing(uninitialized_parameters(root)); }

}  // namespace loadkit
