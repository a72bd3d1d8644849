#include "reload/update_plan.h"

#include <ATen/ATen.h>

#include <functional>

#include "device.h"
#include "loadkit/error.h"

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

bool PlanWrite::record(const WeightWrite& w, const at::Tensor& from, int64_t tensor, PlanWrite& out) {
  out = PlanWrite{};
  out.dst = w.dst;
  if (!w.src.defined()) return true;
  // Replayable only as a view of the tensor being applied: same storage, same element type
  // (offsets are counted in elements of the tensor's dtype).
  if (!from.defined() || !from.has_storage() || !w.src.has_storage() || !w.src.is_alias_of(from) ||
      w.src.scalar_type() != from.scalar_type())
    return false;
  out.tensor = tensor;
  out.offset = w.src.storage_offset() - from.storage_offset();
  out.whole = out.offset == 0 && w.src.sizes() == from.sizes() && w.src.strides() == from.strides();
  if (!out.whole) {
    out.sizes = w.src.sizes().vec();
    out.strides = w.src.strides().vec();
  }
  out.byte_copy = w.src.device() == w.dst.device() && w.src.scalar_type() == w.dst.scalar_type() &&
                  w.src.sizes() == w.dst.sizes() && w.src.is_contiguous() && w.dst.is_contiguous() &&
                  !w.src.is_alias_of(w.dst);  // memcpy: never within one storage
  out.nbytes = static_cast<int64_t>(w.dst.nbytes());
  return true;
}

bool PlanWrite::record_into(const WeightWrite& w, const at::Tensor& from, int64_t tensor, Into into,
                            const at::Tensor& param_data, PlanWrite& out) {
  if (!param_data.has_storage() || !w.dst.is_alias_of(param_data) || w.dst.scalar_type() != param_data.scalar_type() ||
      !record(w, from, tensor, out))
    return false;
  into.offset = w.dst.storage_offset() - param_data.storage_offset();
  into.sizes = w.dst.sizes().vec();
  into.strides = w.dst.strides().vec();
  out.into = std::move(into);
  out.dst = at::Tensor();  // this reload's load format: the next one materialises another
  return true;
}

at::Tensor PlanWrite::Into::view_of(const at::Tensor& param_data) const {
  return param_data.as_strided(sizes, strides, param_data.storage_offset() + offset);
}

void* PlanWrite::Into::bytes_of(const at::Tensor& param_data, int64_t nbytes) const {
  // view_of()'s bounds, which as_strided checks, checked here: a contiguous view `nbytes` long.
  const auto item = static_cast<int64_t>(param_data.itemsize());
  const int64_t begin = (param_data.storage_offset() + offset) * item;
  if (!param_data.has_storage() || begin < 0 || begin + nbytes > static_cast<int64_t>(param_data.storage().nbytes()))
    fail(ErrorKind::Other, "a replayed write of ", nbytes, " bytes at element ", offset,
         " does not fit its parameter's storage (", param_data.has_storage() ? param_data.storage().nbytes() : 0,
         " bytes)");
  return static_cast<char*>(param_data.storage().mutable_data()) + begin;
}

bool SmallCopies::hold(const PlanWrite& pw, const at::Tensor& from, const at::Tensor& param_data) {
  const bool small = pw.byte_copy && pw.nbytes <= kSmallBytes && from.is_contiguous() &&
                     static_cast<int64_t>(from.storage().nbytes()) <= kHeldBytes;
  if (!held_.empty() && (!small || !from.is_alias_of(held_.front().src))) issue();
  if (!small) return false;
  at::Tensor to = pw.destination(param_data);
  if (to.device() != from.device()) {
    issue();
    return false;
  }
  held_.push_back({std::move(to), pw.source(from)});
  return true;
}

void SmallCopies::issue() {
  const std::vector<WeightWrite> writes = std::move(held_);
  held_.clear();  // let go even if issuing fails: the caller's error path issues again
  apply_writes(writes);
}

at::Tensor PlanWrite::source(const at::Tensor& from) const {
  if (tensor < 0) return at::Tensor();
  return whole ? from : from.as_strided(sizes, strides, from.storage_offset() + offset);
}

bool PlanWrite::copy_bytes(const at::Tensor& from, const at::Tensor& param_data) const {
  const at::Tensor& to = into ? param_data : dst;
  if (!byte_copy || !from.is_contiguous() || from.device() != to.device()) return false;
  const auto* src = static_cast<const char*>(from.const_data_ptr()) + offset * static_cast<int64_t>(from.itemsize());
  void* out = into ? into->bytes_of(param_data, nbytes) : dst.mutable_data_ptr();
  device::copy_bytes(to.device(), out, src, static_cast<uint64_t>(nbytes));
  return true;
}

void UpdatePlan::note_write(const WeightWrite& w, const std::vector<NamedWeight>& chunk, int64_t tensor) {
  const bool in_chunk = tensor >= 0 && tensor < static_cast<int64_t>(chunk.size());
  PlanWrite pw;
  if (!PlanWrite::record(w, in_chunk ? chunk[static_cast<size_t>(tensor)].tensor : at::Tensor(), tensor, pw)) {
    replayable = false;
    return;
  }
  writes.push_back(std::move(pw));
}

void UpdatePlan::note_write_into(const WeightWrite& w, const std::vector<NamedWeight>& chunk, int64_t tensor,
                                 const PlanWrite::Into& into, const at::Tensor& param_data) {
  const bool in_chunk = tensor >= 0 && tensor < static_cast<int64_t>(chunk.size());
  PlanWrite pw;
  if (!PlanWrite::record_into(w, in_chunk ? chunk[static_cast<size_t>(tensor)].tensor : at::Tensor(), tensor, into,
                              param_data, pw)) {
    replayable = false;
    return;
  }
  writes.push_back(std::move(pw));
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
