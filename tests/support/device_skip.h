#pragma once
/// \file
/// Skips a GPU test, visibly, where no CUDA device is present (the CPU suite
/// shows it as skipped with the reason; the GPU machine runs it).

#include <ATen/Context.h>
#include <gtest/gtest.h>

#define SKIP_WITHOUT(device)                                                        \
  if ((device) != "cpu" && !at::hasCUDA()) {                                        \
    GTEST_SKIP() << "no CUDA device here; runs on the GPU machine (device tool)"; \
  }
