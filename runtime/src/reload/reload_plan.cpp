#include "reload/reload_plan.h"

namespace loadkit::reload {

CheckpointLayout CheckpointLayout::of(const safetensors::CheckpointFiles& files) {
  CheckpointLayout out;
  out.tensors.reserve(files.total_tensors);
  for (const auto& file : files.files)
    for (const auto& info : file->tensors()) out.tensors.push_back({info.name, info.dtype, info.shape});
  return out;
}

bool CheckpointLayout::matches(const safetensors::CheckpointFiles& files) const {
  if (files.total_tensors != tensors.size()) return false;
  size_t k = 0;
  for (const auto& file : files.files)
    for (const auto& info : file->tensors()) {
      if (k >= tensors.size()) return false;
      const Tensor& t = tensors[k++];
      if (t.dtype != info.dtype || t.shape != info.shape || t.name != info.name) return false;
    }
  return k == tensors.size();
}

std::unique_ptr<ReloadPlan> ReloadPlan::start(const safetensors::CheckpointFiles& files, std::vector<std::string> order) {
  auto plan = std::make_unique<ReloadPlan>();
  plan->layout = CheckpointLayout::of(files);
  if (order.size() == plan->layout.tensors.size()) {
    plan->order = std::move(order);
  } else if (!order.empty()) {
    plan->replayable = false;  // not every tensor once: never replayed (the stream refuses such an order)
  }
  plan->ends.resize(plan->layout.tensors.size());
  return plan;
}

void ReloadPlan::close_current() {
  if (arrived_ == 0 || arrived_ > ends.size()) return;
  ends[arrived_ - 1] = {feeds.size(), writes.size()};
}

void ReloadPlan::arrived(const std::string& name) {
  close_current();
  if (arrived_ >= layout.tensors.size() || delivered(arrived_) != name) replayable = false;
  ++arrived_;
}

void ReloadPlan::ended() {
  close_current();
  if (arrived_ != layout.tensors.size()) replayable = false;
}

}  // namespace loadkit::reload
