#include "reload/kernel_copy.h"

#include <ATen/ATen.h>

#include <unordered_map>
#include <unordered_set>

#include "loadkit/auto_weights_loader.h"
#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/log.h"
#include "reload/storage_snapshot.h"
#include "weight_sources.h"

namespace loadkit::reload {

namespace {

/// The layer a parameter belongs to: its qualified name up to the last dot (parameter names have none).
std::string layer_of(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

}  // namespace

KernelCopyTargets parameter_targets(const Module& root) {
  KernelCopyTargets targets;
  targets.what = "a parameter of the model";
  for (auto& [name, p] : root.named_parameters()) targets.tensors.emplace_back(name, p->data);
  return targets;
}

ReloadStats copy_kernel_format(Module& root, const KernelCopyTargets& targets, const safetensors::CheckpointFiles& files,
                               const c10::Device& device, bool complete, Rollback rollback,
                               std::vector<std::string>* written, uint64_t window_bytes) {
  if (written) written->clear();
  const StorageSnapshot before(root);
  std::unordered_map<std::string, at::Tensor> by_name(targets.tensors.begin(), targets.tensors.end());
  auto check = [&](const NamedWeight& w) -> const at::Tensor& {
    auto it = by_name.find(w.name);
    if (it == by_name.end())
      fail(ErrorKind::Input, w.origin, ": tensor '", w.name, "' is not ", targets.what, " (kernel format)");
    const at::Tensor& dst = it->second;
    bool fits = w.tensor.scalar_type() == dst.scalar_type();
    if (targets.leading_part_fits) {
      fits = fits && w.tensor.dim() == dst.dim();
      for (int64_t d = 0; fits && d < dst.dim(); ++d) fits = w.tensor.size(d) <= dst.size(d);
    } else {
      fits = fits && w.tensor.sizes() == dst.sizes();
    }
    if (!fits)
      fail(ErrorKind::Input, w.origin, ": tensor '", w.name, "' is ", shape_str(w.tensor.sizes()), " ",
           c10::toString(w.tensor.scalar_type()), ", the parameter is ", shape_str(dst.sizes()), " ",
           c10::toString(dst.scalar_type()));
    return dst;
  };

  // Every header first: nothing is written unless all of it fits.
  std::unordered_set<std::string> seen;
  {
    auto headers = safetensors_header_stream(files);
    NamedWeight w;
    while (headers->next(w)) {
      check(w);
      if (!seen.insert(w.name).second) fail(ErrorKind::Input, w.origin, ": tensor '", w.name, "' given twice");
    }
  }
  if (complete) {
    std::vector<std::string> missing;
    for (const auto& [name, t] : targets.tensors)
      if (!seen.count(name)) missing.push_back(name);
    fail_if_missing(std::move(missing));
  }

  // A tensor counts for the layer that owns its parameter (a tied weight: its first owner).
  std::unordered_map<const c10::TensorImpl*, std::string> owner;
  for (const auto& [name, p] : root.named_parameters()) owner.emplace(p->data.unsafeGetTensorImpl(), layer_of(name));
  std::unordered_set<std::string> layers;
  std::vector<std::string> in_order;  // layers as first written
  std::vector<std::pair<at::Tensor, at::Tensor>> journal;  // (target, its host copy) with Rollback::Journal
  uint64_t journal_bytes = 0;
  try {
    StreamPlan plan;
    plan.window_bytes = window_bytes;
    auto data = open_weight_stream(files, device, plan);
    NamedWeight w;
    while (data->next(w)) {
      at::Tensor dst = check(w);
      auto it = owner.find(dst.unsafeGetTensorImpl());
      const std::string layer = it != owner.end() ? it->second : layer_of(w.name);
      if (layers.insert(layer).second) in_order.push_back(layer);
      if (w.tensor.sizes() != dst.sizes()) {
        log::warn(cat("loading tensor of shape ", shape_str(w.tensor.sizes()), " into parameter '", w.name,
                      "' of shape ", shape_str(dst.sizes())));
        for (int64_t d = 0; d < dst.dim(); ++d) dst = dst.narrow(d, 0, w.tensor.size(d));
      }
      if (rollback == Rollback::Journal) {
        journal.emplace_back(dst, dst.to(at::kCPU, /*non_blocking=*/false, /*copy=*/true));
        journal_bytes += dst.nbytes();
      }
      dst.copy_(w.tensor);
    }
  } catch (...) {
    for (auto it = journal.rbegin(); it != journal.rend(); ++it) it->first.copy_(it->second);
    if (!journal.empty()) log::info(cat("rolled back ", journal.size(), " kernel tensors"));
    if (written && rollback != Rollback::Journal) *written = in_order;
    throw;
  }
  ReloadStats stats;
  stats.journal_bytes = journal_bytes;
  stats.journaled_modules = rollback == Rollback::Journal ? static_cast<int>(layers.size()) : 0;
  stats.layers_processed = static_cast<int>(layers.size());
  stats.pointers_stable = before.unchanged(root);
  return stats;
}

}  // namespace loadkit::reload
