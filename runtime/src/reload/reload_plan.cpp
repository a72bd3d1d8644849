#include "reload/reload_plan.h"

namespace loadkit::reload {

std::unique_ptr<ReloadPlan> ReloadPlan::start(const safetensors::CheckpointFiles& files) {
  auto plan = std::make_unique<ReloadPlan>();
  plan->layout.reserve(files.total_tensors);
  for (const auto& file : files.files)
    for (const auto& info : file->tensors()) plan->layout.push_back({info.name, info.dtype, info.shape});
  return plan;
}

bool ReloadPlan::matches(const safetensors::CheckpointFiles& files) const {
  if (files.total_tensors != layout.size()) return false;
  size_t k = 0;
  for (const auto& file : files.files)
    for (const auto& info : file->tensors()) {
      if (k >= layout.size()) return false;
      const Entry& e = layout[k++];
      if (e.dtype != info.dtype || e.shape != info.shape || e.name != info.name) return false;
    }
  return k == layout.size();
}

void ReloadPlan::close_current() {
  if (arrived_ == 0 || arrived_ > layout.size()) return;
  layout[arrived_ - 1].feeds_end = feeds.size();
  layout[arrived_ - 1].writes_end = writes.size();
}

void ReloadPlan::arrived(const std::string& name) {
  close_current();
  if (arrived_ >= layout.size() || layout[arrived_].name != name) replayable = false;
  ++arrived_;
}

void ReloadPlan::ended() {
  close_current();
  if (arrived_ != layout.size()) replayable = false;
}

}  // namespace loadkit::reload
