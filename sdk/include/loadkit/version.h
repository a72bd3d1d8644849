#pragma once
/// \file
/// The SDK version, the one place it is written (CMake parses it from here).
///
/// The major version changes whenever a header of the SDK changes in a way
/// that breaks plugins built against an earlier one; the host refuses a
/// plugin whose SDK major differs from its own. 1.0: the decoder skeleton, the
/// processing-scratch hooks of LinearMethod/FusedMoEMethod and loadkit::Error exported
/// from libloadkit_sdk changed what a plugin compiles against. Added within 1.0
/// (unreleased, so plugins built against an earlier 1.0 tree must be rebuilt):
/// blocked-parameter loaders and fused-part queries of the linear layers
/// (LinearBase::block_loader, output_parts, part_of, output_row_loader;
/// FusedMoE::block_loader), QuantConfig's quantize-on-arrival flag (a data
/// member: QuantConfig's layout changed), ModelConfig::keys, and per-layer
/// methods: QuantConfig::linear_method / moe_method take the layer's
/// LayerPrefix (their signatures changed), LinearBase/FusedMoE::use_method and
/// assign_quant_methods, which the host calls after an architecture factory;
/// loadkit::note (notes.h), which a plugin built against an earlier 1.0 tree
/// simply does not call; describing_writes / describes_writes (weight_writes.h)
/// take the dtypes a loader keeps its promise for (their symbols changed).

#define LOADKIT_VERSION_MAJOR 1
#define LOADKIT_VERSION_MINOR 0
#define LOADKIT_VERSION_PATCH 0
