#pragma once
/// \file
/// Test helpers that need libtorch and the runtime: loading a fixture, its
/// transformers reference, kernel-state snapshots and the DESIGN tolerances.

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>

#include "test_support.h"

namespace loadkit {
class LoadedModel;
class Registry;
}  // namespace loadkit

namespace loadkit::test {

/// One registry over the build tree's plugin directory, shared by a test binary.
Registry& build_registry();

/// Loads `dir` through the C++ API.
std::unique_ptr<LoadedModel> load_model(const std::string& dir, const std::string& device = "cpu",
                                        const std::string& quant = "none", const std::string& dtype = "auto",
                                        const std::string& format = "auto");

/// transformers' float32 logits stored with the fixture.
at::Tensor reference_logits(const Fixture& f);

/// DESIGN's tolerances: float32 max abs diff ≤ 1e-4; 16-bit cosine ≥ 0.999 per row and argmax agreement.
void expect_close(const at::Tensor& ours, const at::Tensor& ref, const std::string& dtype);

/// Every kernel tensor (parameters and buffers), cloned, by dotted name.
std::map<std::string, at::Tensor> kernel_state(LoadedModel& m);

/// Same names, dtypes, shapes and bytes.
void expect_identical(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b);

}  // namespace loadkit::test
