#include "caller_tensor.h"

#include <ATen/core/Tensor.h>

#include <string>

#include "loadkit/error.h"

namespace loadkit {

namespace {

/// What is wrong with `t` as a source of data, or "" when nothing is.
std::string unreadable(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  if (t.is_nested()) return "a nested tensor; pass each of its tensors under its own name";
  if (t.layout() != c10::kStrided)
    return cat("a tensor of layout ", t.layout(), ", not a dense one; pass tensor.to_dense()");
  if (t.is_meta()) return "a meta tensor, which holds no data";
  if (t.is_quantized())
    return cat("a quantized tensor (", c10::toString(t.scalar_type()), "); pass a dense one (tensor.dequantize())");
  if (!t.is_cpu() && !t.is_cuda())
    return cat("on device '", t.device().str(), "'; loadkit reads tensors on the CPU or a CUDA device");
  if (t.key_set().has(c10::DispatchKey::Functionalize) || t.key_set().has(c10::DispatchKey::Python))
    return "a wrapper tensor (functionalized, or a subclass that dispatches to Python) with no plain data of its own";
  if (!t.has_storage()) return "a tensor without storage";
  return "";
}

}  // namespace

void require_plain_data(const at::Tensor& tensor, std::string_view origin, std::string_view name) {
  const std::string what = unreadable(tensor);
  if (!what.empty()) fail(ErrorKind::Input, origin, ": tensor '", name, "' is ", what);
}

}  // namespace loadkit
