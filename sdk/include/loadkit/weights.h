#pragma once
/// \file
/// A stream of named checkpoint tensors, as every weight source yields them.

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace loadkit {

/// One checkpoint tensor and where it came from.
struct NamedWeight {
  std::string name;    ///< checkpoint name, e.g. "model.layers.0.self_attn.q_proj.weight"
  at::Tensor tensor;   ///< may be a zero-copy view of a mapped file: read only
  std::string origin;  ///< file (or other source) it came from, for messages
};

/// Yields tensors one at a time, lazily, in source order.
class WeightStream {
 public:
  virtual ~WeightStream() = default;
  /// Fills `out` and returns true, or returns false at the end.
  virtual bool next(NamedWeight& out) = 0;
};

/// A stream over tensors already in memory (tests, trainers).
class VectorWeightStream : public WeightStream {
 public:
  explicit VectorWeightStream(std::vector<NamedWeight> weights) : weights_(std::move(weights)) {}
  bool next(NamedWeight& out) override {
    if (pos_ >= weights_.size()) return false;
    out = weights_[pos_++];
    return true;
  }

 private:
  std::vector<NamedWeight> weights_;
  size_t pos_ = 0;
};

}  // namespace loadkit
