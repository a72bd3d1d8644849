// Granite, served by the out-of-tree example plugin (examples/plugin_template), built in-tree
// here; CI builds it against the installed SDK too (sdk.installed_plugin).
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Granite, "granite_fp32_gqa", "granite_bf16_tied_bias");
LOADKIT_ARCH_RELOADS(Granite, "granite_fp32_gqa");

}  // namespace loadkit::test
