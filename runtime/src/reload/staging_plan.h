#pragma once
/// \file
/// How a validated reload reads its data: the order the tensors come in and
/// how far the stream may read ahead, so that its extra device memory stays
/// within the largest layer's load-format size (the reload's bound).
///
/// A module whose processing transforms its weights is materialised in load
/// format while it is rebuilt (module_step.h). The plan delivers each such
/// module's tensors together, modules in the order their first tensor came,
/// so that one module is materialised at a time whatever the files' order;
/// for each of those tensors it reserves, inside the window, the module's
/// load format plus the scratch its processing allocates — the figure the
/// module's quantization method states (LinearMethod / FusedMoEMethod::
/// process_scratch_bytes), not one the runtime guesses.

#include <vector>

#include "reload/records.h"
#include "reload/validation.h"
#include "weight_sources.h"

namespace loadkit {
struct ModelContext;
}

namespace loadkit::reload {

/// Whether the plan depends on what validation sees: a module is rebuilt (attention-like ones
/// aside), so its tensors must come together in an order only validation knows. Otherwise the
/// plan is the files' order and the window, and the stream may open before validation.
bool plan_needs_validation(const std::vector<ModuleRecord>& modules);

/// The applying stream's order, reserves and window, from the last recorded validation.
/// Without a transformed module (attention-like ones aside, processed at the end) the
/// order stays the files' and only the window is set.
StreamPlan plan_apply(const std::vector<ModuleRecord>& modules, const ValidationRecord& seen, const ModelContext& ctx);

/// What processing `module` allocates beside its load format, as its method states it
/// (0 for modules that are not a linear or MoE layer of the SDK).
uint64_t processing_scratch(Module& module, const ModelContext& ctx);

}  // namespace loadkit::reload
