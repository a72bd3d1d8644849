#include "reload/storage_snapshot.h"

#include <ATen/core/Tensor.h>

#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/log.h"

namespace loadkit::reload {

StorageSnapshot::StorageSnapshot(const Module& root) : facts_(take(root)) {}

std::unordered_map<std::string, StorageSnapshot::Facts> StorageSnapshot::take(const Module& root) {
  std::unordered_map<std::string, Facts> facts;
  auto note = [&](const std::string& name, const at::Tensor& t) {
    Facts f{nullptr, {}, {}, c10::ScalarType::Undefined};
    if (t.defined()) f = {t.data_ptr(), t.sizes().vec(), t.strides().vec(), t.scalar_type()};
    facts.emplace(name, std::move(f));
  };
  for (const auto& [name, p] : root.named_parameters()) note(name, p->data);
  for (const auto& [prefix, module] : root.named_modules())
    for (const auto& [name, b] : module->buffers()) note(prefix.empty() ? name : prefix + "." + name, b);
  return facts;
}

bool StorageSnapshot::unchanged(const Module& root) const {
  const auto now = take(root);
  for (const auto& [name, before] : facts_) {
    auto it = now.find(name);
    if (it == now.end() || !(it->second == before)) {
      log::warn(cat("kernel tensor '", name, "' changed storage or layout"));
      return false;
    }
  }
  return true;
}

}  // namespace loadkit::reload
