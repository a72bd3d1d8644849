// A second plugin claiming LlamaForCausalLM; whichever is found first serves it.
#include "loadkit/error.h"
#include "loadkit/plugin.h"

namespace {
void register_dup(loadkit::Registrar& r) {
  r.add_architecture("LlamaForCausalLM", [](const loadkit::ModelContext&) -> std::shared_ptr<loadkit::CausalLM> {
    loadkit::fail(loadkit::ErrorKind::Plugin, "dup_llama was asked to build LlamaForCausalLM");
  });
}
}  // namespace

LOADKIT_PLUGIN("dup_llama", "0.1.0", register_dup)
