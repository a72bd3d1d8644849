// A plugin compiled against another torch: refused with both versions named.
#include "loadkit/plugin.h"

namespace {
void never_called(loadkit::Registrar&) {}
const loadkit_plugin_descriptor descriptor = {
    LOADKIT_PLUGIN_ABI_VERSION, LOADKIT_VERSION_MAJOR, LOADKIT_VERSION_MINOR, LOADKIT_VERSION_PATCH, "1.13.1",
    LOADKIT_CXX_ABI_TAG, LOADKIT_COMPILER, "wrong_torch", "1.0.0",
    [](loadkit_registrar* r, char* e, size_t n) noexcept -> int { return loadkit::detail::call_register(never_called, r, e, n); }};
}  // namespace

extern "C" __attribute__((visibility("default"))) const loadkit_plugin_descriptor* loadkit_plugin_v1() {
  return &descriptor;
}
