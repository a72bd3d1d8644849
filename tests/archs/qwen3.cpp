// Qwen3, served by the out-of-tree example plugin (examples/plugin_template),
// built in-tree here; CI builds it against the installed SDK too (sdk.installed_plugin).
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Qwen3, "qwen3_fp32_gqa", "qwen3_bf16_tied_bias");
LOADKIT_ARCH_RELOADS(Qwen3, "qwen3_fp32_gqa");

}  // namespace loadkit::test
