#include "reload/validation.h"

#include <ATen/ATen.h>

namespace loadkit::reload {

bool MetaStream::next(NamedWeight& out) {
  if (!inner_.next(out)) return false;
  const at::Tensor& t = out.tensor;
  out.tensor = at::empty_strided(t.sizes(), t.strides(), at::TensorOptions().dtype(t.scalar_type()).device(at::kMeta));
  return true;
}

bool RecordingStream::next(NamedWeight& out) {
  if (!inner_.next(out)) return false;
  record_.current = out.name;
  record_.names.push_back(out.name);
  return true;
}

}  // namespace loadkit::reload
