#pragma once
/// \file
/// Skips a GPU test, visibly, where no CUDA device is present (the CPU suite
/// shows it as skipped with the reason; the GPU machine runs it), or where the
/// build has no process-group backend.

#include <ATen/Context.h>
#include <gtest/gtest.h>

#include "loadkit/runtime/distributed.h"

#define SKIP_WITHOUT(device)                                                        \
  if ((device) != "cpu" && !at::hasCUDA()) {                                        \
    GTEST_SKIP() << "no CUDA device here; runs on the GPU machine (device tool)"; \
  }

/// Skips, visibly, where this build has no process-group backend for `device` ("cpu", "cuda").
#define SKIP_WITHOUT_TP_BACKEND(device)                                             \
  if (auto why = loadkit::tp_unavailable_reason(device)) {                         \
    GTEST_SKIP() << "no tensor-parallel backend for " << (device) << ": " << *why; \
  }
