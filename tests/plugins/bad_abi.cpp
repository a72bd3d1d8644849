// A plugin built against a future ABI: the host must refuse it before reading further.
#include "loadkit/plugin_abi.h"

namespace {
int never_called(loadkit_registrar*, char*, size_t) { return 0; }
const loadkit_plugin_descriptor descriptor = {
    LOADKIT_PLUGIN_ABI_VERSION + 1, 0, 1, 0, "2.11.0", "", "", "bad_abi", "9.9.9", never_called};
}  // namespace

extern "C" __attribute__((visibility("default"))) const loadkit_plugin_descriptor* loadkit_plugin_v1() {
  return &descriptor;
}
