#include "reload/staging_plan.h"

#include <algorithm>
#include <cstdint>
#include <unordered_map>

#include "loadkit/layers/fused_moe.h"
#include "loadkit/layers/linear.h"
#include "loadkit/model_context.h"

namespace loadkit::reload {

uint64_t processing_scratch(Module& module, const ModelContext& ctx) {
  if (auto* linear = dynamic_cast<LinearBase*>(&module)) return linear->method().process_scratch_bytes(linear->shape(), ctx);
  if (auto* moe = dynamic_cast<FusedMoE*>(&module)) return moe->method().process_scratch_bytes(moe->shape(), ctx);
  return 0;
}

bool plan_needs_validation(const std::vector<ModuleRecord>& modules) {
  return std::any_of(modules.begin(), modules.end(), [](const ModuleRecord& m) { return m.transforms && !m.attention_like; });
}

StreamPlan plan_apply(const std::vector<ModuleRecord>& modules, const ValidationRecord& seen, const ModelContext& ctx) {
  StreamPlan plan;
  for (const auto& mod : modules) plan.window_bytes = std::max(plan.window_bytes, mod.load_bytes);
  if (!plan_needs_validation(modules)) return plan;
  // The scratch is part of what the module holds while it is rebuilt, so it is reserved with the
  // module rather than taken off the whole window: taking it off the window left the largest plain
  // tensor, the embedding, outside it (read from the mapping instead), which halved an fp8 reload
  // on the GPU machine.
  constexpr size_t kNone = SIZE_MAX;
  std::unordered_map<size_t, std::vector<const std::string*>> groups;
  std::vector<std::pair<size_t, const std::string*>> sequence;  // (module or kNone, name)
  for (const auto& name : seen.names) {
    auto it = seen.module_of.find(name);
    const size_t m = it == seen.module_of.end() || !modules[it->second].transforms ? kNone : it->second;
    if (m == kNone) {
      sequence.emplace_back(kNone, &name);
      continue;
    }
    auto& group = groups[m];
    if (group.empty()) sequence.emplace_back(m, nullptr);
    group.push_back(&name);
  }
  for (const auto& [m, name] : sequence) {
    if (m == kNone) {
      plan.order.push_back(*name);
      plan.reserve.push_back(0);
      continue;
    }
    const uint64_t reserve = modules[m].load_bytes + processing_scratch(*modules[m].module, ctx);
    for (const std::string* n : groups[m]) {
      plan.order.push_back(*n);
      plan.reserve.push_back(reserve);
    }
  }
  return plan;
}

}  // namespace loadkit::reload
