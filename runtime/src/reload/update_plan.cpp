#include "reload/update_plan.h"

#include <ATen/ATen.h>

#include <functional>

namespace loadkit::reload {

bool TensorSignature::matches(const NamedWeight& w) const {
  const at::Tensor& t = w.tensor;
  return t.defined() && t.scalar_type() == dtype && t.device() == device && t.sizes() == at::IntArrayRef(sizes) &&
         t.strides() == at::IntArrayRef(strides) && w.name == name;
}

bool UpdatePlan::matches(const std::vector<NamedWeight>& chunk) const {
  if (chunk.size() != signature.size()) return false;
  for (size_t k = 0; k < chunk.size(); ++k)
    if (!signature[k].matches(chunk[k])) return false;
  return true;
}

void UpdatePlan::note_write(const WeightWrite& w, const std::vector<NamedWeight>& chunk, int64_t tensor) {
  PlanWrite pw;
  pw.dst = w.dst;
  if (w.src.defined()) {
    // Replayable only as a view of the tensor being applied: same storage, same element type
    // (offsets are counted in elements of the tensor's dtype).
    if (tensor < 0 || tensor >= static_cast<int64_t>(chunk.size())) {
      replayable = false;
      return;
    }
    const at::Tensor& from = chunk[static_cast<size_t>(tensor)].tensor;
    if (!from.has_storage() || !w.src.has_storage() || !w.src.is_alias_of(from) ||
        w.src.scalar_type() != from.scalar_type()) {
      replayable = false;
      return;
    }
    pw.tensor = tensor;
    pw.offset = w.src.storage_offset() - from.storage_offset();
    pw.whole = pw.offset == 0 && w.src.sizes() == from.sizes() && w.src.strides() == from.strides();
    if (!pw.whole) {
      pw.sizes = w.src.sizes().vec();
      pw.strides = w.src.strides().vec();
    }
  }
  writes.push_back(std::move(pw));
}

std::vector<WeightWrite> UpdatePlan::writes_for(const std::vector<NamedWeight>& chunk) const {
  std::vector<WeightWrite> out;
  out.reserve(writes.size());
  for (const auto& w : writes) {
    if (w.tensor < 0) {
      out.push_back({w.dst, at::Tensor()});
      continue;
    }
    const at::Tensor& from = chunk[static_cast<size_t>(w.tensor)].tensor;
    out.push_back({w.dst, w.whole ? from : from.as_strided(w.sizes, w.strides, from.storage_offset() + w.offset)});
  }
  return out;
}

size_t PlanCache::hash(const std::vector<NamedWeight>& chunk) {
  size_t h = chunk.size();
  for (const auto& w : chunk) h = h * 1000003u ^ std::hash<std::string>{}(w.name);
  return h;
}

const UpdatePlan* PlanCache::find(const std::vector<NamedWeight>& chunk) const {
  auto [begin, end] = plans_.equal_range(hash(chunk));
  for (auto it = begin; it != end; ++it)
    if (it->second->matches(chunk)) return it->second.get();
  return nullptr;
}

std::unique_ptr<UpdatePlan> PlanCache::start(const std::vector<NamedWeight>& chunk) {
  auto plan = std::make_unique<UpdatePlan>();
  plan->key = hash(chunk);
  plan->signature.reserve(chunk.size());
  for (const auto& w : chunk) {
    const at::Tensor& t = w.tensor;
    if (!t.defined()) {
      plan->replayable = false;  // validation rejects it; never kept
      plan->signature.push_back({w.name, {}, {}, at::ScalarType::Undefined, c10::Device(c10::kCPU)});
      continue;
    }
    plan->signature.push_back({w.name, t.sizes().vec(), t.strides().vec(), t.scalar_type(), t.device()});
  }
  return plan;
}

void PlanCache::keep(std::unique_ptr<UpdatePlan> plan) {
  if (plans_.size() >= kPlans) plans_.clear();  // a new set of buckets: start over
  plans_.emplace(plan->key, std::move(plan));
}

}  // namespace loadkit::reload
