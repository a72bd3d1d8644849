#pragma once
/// \file
/// Loaders that describe their writes: the mechanism that lets a weight update
/// issue the copies of many small tensors as a few multi-tensor kernels.
///
/// A `WeightLoader` (module.h) writes into `param.data` however it likes. A
/// loader wrapped by `describing_writes()` promises more, and the promise binds
/// every write it makes into `param.data`:
///   1. each write goes through `copy_weight(dst, src)` or `zero_weight(dst)`,
///      where `dst` is a view of `param.data` and `src` a view of the tensor it
///      was given (no temporary: no `.to()`, `.contiguous()` or arithmetic);
///   2. which views those are depends only on the given tensor's shape,
///      strides and dtype and on the shard id, never on its values or on what
///      `param.data` holds;
///   3. it reads nothing back from `param.data`, and no two of its writes overlap.
/// With no `WriteRecorder` installed on the thread, `copy_weight` and
/// `zero_weight` write at once, so such a loader works as any other (loads,
/// validation on meta stand-ins). While one is installed, they append to it
/// instead, and the caller issues them with `apply_writes()`; what 2. adds is
/// that the caller may keep the recorded views and replay them for another
/// tensor of the same shape, strides and dtype without calling the loader.
///
/// A loader may keep the promise for some dtypes of the given tensor only (an
/// fp8 weight's loader copies an fp8 tensor as it is and quantizes a 16-bit
/// one into temporaries): `describing_writes(loader, {dtypes})` promises it for
/// a given tensor of those dtypes; for any other the caller calls it as a plain
/// loader (its writes go at once, none is kept).
///
/// The SDK's own layers (default_weight_loader, the parallel linears and their
/// block loaders, the vocabulary embeddings, FusedMoE and its block loader)
/// describe their writes. A plugin's loader is a plain WeightLoader unless it
/// wraps itself; wrapping a loader that breaks the promise makes updates and
/// reloads by plan write wrong bytes.

#include <ATen/core/Tensor.h>

#include <vector>

#include "loadkit/module.h"

namespace loadkit {

/// One described write: `dst` ← `src`, or `dst` ← 0 when `src` is undefined.
struct WeightWrite {
  at::Tensor dst;
  at::Tensor src;
};

/// While alive, the calling thread's copy_weight()/zero_weight() append to `into` instead of
/// writing. Nests: the previous recorder (if any) is reinstated on destruction.
class WriteRecorder {
 public:
  explicit WriteRecorder(std::vector<WeightWrite>& into);
  ~WriteRecorder();
  WriteRecorder(const WriteRecorder&) = delete;
  WriteRecorder& operator=(const WriteRecorder&) = delete;

 private:
  std::vector<WeightWrite>* previous_;
};

/// `dst.copy_(src)`, or recorded (see WriteRecorder). Shapes must be equal (the loader checked them).
void copy_weight(const at::Tensor& dst, const at::Tensor& src);
/// `dst.zero_()`, or recorded.
void zero_weight(const at::Tensor& dst);

/// Issues `writes` (order among them does not matter: they do not overlap): the copies as one
/// `_foreach_copy_` per (destination dtype, source dtype, destination device, source device)
/// group, except contiguous same-dtype copies of 16 MiB or more on one CUDA device, each a
/// `copy_` of its own (a memcpy is faster there); the zeros as one `_foreach_zero_` per device.
/// Same bytes as writing them one by one.
void apply_writes(const std::vector<WeightWrite>& writes);

/// `loader`, marked as keeping the promise above for a given tensor of any dtype in `dtypes`
/// (every dtype when empty).
WeightLoader describing_writes(WeightLoader loader, std::vector<at::ScalarType> dtypes = {});
/// Whether `loader` was made by describing_writes() and keeps the promise for a given tensor of
/// dtype `loaded`.
bool describes_writes(const WeightLoader& loader, at::ScalarType loaded);

}  // namespace loadkit
