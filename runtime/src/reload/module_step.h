#pragma once
/// \file
/// One module's way through a session, step by step. Only modules whose
/// processing transforms their parameters (`ModuleRecord::transforms`) take
/// these steps; plain modules are written straight into their kernel tensors
/// by their own loaders.
///
///   begin:  take_kernel()            the kernel tensors as found, the load format back on meta
///   apply:  materialize()            the load format allocated on the device (first weight, or at process)
///   done:   process_into_kernel()    kept loads replayed, processed into the kernel tensors,
///                                    kernel objects back, load format freed
///   else:   put_back_kernel()        nothing written: the module as it was
///
/// The process step is the unit a quantization scheme's reload cost lives in:
/// the module holds its load format (`load_bytes`) plus what its method says
/// processing allocates (staging_plan.h reserves both) only between
/// materialize() and the end of process_into_kernel().

#include <c10/core/Device.h>

#include "reload/records.h"

namespace loadkit::reload {

/// Session start: remembers `mod`'s kernel tensors; when it transforms, swaps its parameters
/// for the recorded load-format objects on the meta device (nothing allocated yet).
void take_kernel(ModuleRecord& mod);

/// Allocates `mod`'s load-format parameters on `device`, for its loaders to fill.
void materialize(ModuleRecord& mod, const c10::Device& device);

/// The per-module process step: materializes and replays the kept loads (unless the loaders
/// wrote the materialized load format already), runs the module's processing with its kernel
/// tensors as targets, copies what it made elsewhere into them, puts the kernel objects back
/// and frees the load format. Throws (Other) when processing produced another shape or dtype.
/// The caller journals the kernel tensors first (processing writes into them).
void process_into_kernel(ModuleRecord& mod, const c10::Device& device);

/// The module's kernel parameters (the very objects and storage it had) back in place, the
/// load format freed: for a module that ends the session unwritten.
void put_back_kernel(ModuleRecord& mod);

/// Every parameter's loader back to the one it was built with (the session wrapped them).
void restore_loaders(ModuleRecord& mod);

}  // namespace loadkit::reload
