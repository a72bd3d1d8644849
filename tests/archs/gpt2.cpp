// GPT-2 (plugins/gpt2): Conv1D [in, out] weights, both checkpoint spellings (with and without the
// `transformer.` prefix, the latter with the old attn.bias buffers), layer-scaled and unscaled attention.
#include "arch_suite.h"

namespace loadkit::test {

LOADKIT_ARCH_FIXTURES(Gpt2, "gpt2_fp32_prefixed", "gpt2_fp32_unprefixed", "gpt2_fp32_layer_scaled",
                      "gpt2_bf16_untied", "gpt2_bf16_tied", "gpt2_bf16_tied_unprefixed");
LOADKIT_ARCH_RELOADS(Gpt2, "gpt2_bf16_untied");

}  // namespace loadkit::test
