#include "reload/records.h"

#include <ATen/ATen.h>

#include <unordered_set>


namespace loadkit::reload {

std::vector<ModuleRecord> record_load_format(Module& root) {
  std::vector<ModuleRecord> modules;
  std::unordered_set<const Parameter*> seen;
  for (auto& [name, module] : root.named_modules()) {
    ModuleRecord rec;
    rec.name = name;
    rec.module = module;
    rec.attention_like = module->is_attention_like();
    for (const auto& [pname, p] : module->parameters()) {
      if (!seen.insert(p.get()).second) continue;  // managed by its first owner (tied weights)
      rec.params.push_back(ParamRecord{pname, name.empty() ? pname : name + "." + pname, p, p->data.sizes().vec(),
                                       p->data.scalar_type(), p->loader, p->sharding,
                                       p->expected_load_numel});
      rec.load_bytes += static_cast<uint64_t>(p->data.numel()) * p->data.element_size();
    }
    if (!rec.params.empty()) modules.push_back(std::move(rec));
  }
  return modules;
}

at::Tensor meta_tensor(const std::vector<int64_t>& shape, at::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
}

}  // namespace loadkit::reload
