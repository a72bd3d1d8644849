#include "reload/journal.h"

#include <ATen/ATen.h>

#include "loadkit/error.h"
#include "loadkit/runtime/log.h"

namespace loadkit::reload {

namespace {
/// A host copy of `t` (pinned when it comes from a GPU).
at::Tensor host_copy(const at::Tensor& t) {
  at::Tensor copy = at::empty(t.sizes(), at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU).pinned_memory(t.is_cuda()));
  copy.copy_(t);
  return copy;
}
}  // namespace

void Journal::begin(Rollback mode) {
  clear();
  mode_ = mode;
  bytes_ = 0;
  modules_ = 0;
}

void Journal::keep(const ModuleRecord& mod) {
  if (mode_ != Rollback::Journal || !kept_.insert(&mod).second) return;
  auto keep_one = [&](const at::Tensor& kernel) {
    entries_.emplace_back(kernel, host_copy(kernel));
    bytes_ += kernel.nbytes();
  };
  for (const auto& [name, kernel] : mod.kernel.data) keep_one(kernel);
  for (const auto& [name, kernel] : mod.kernel.buffers) keep_one(kernel);
  ++modules_;
}

void Journal::restore() {
  for (auto it = entries_.rbegin(); it != entries_.rend(); ++it) it->first.copy_(it->second);
  if (!entries_.empty()) log::info(cat("rolled back ", modules_, " modules (", entries_.size(), " kernel tensors)"));
  clear();
}

void Journal::clear() {
  entries_.clear();
  kept_.clear();
}

}  // namespace loadkit::reload
