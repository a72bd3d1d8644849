// A plugin whose registration throws: the exception must stay inside the plugin
// and come back as an error value.
#include <stdexcept>

#include "loadkit/plugin.h"

namespace {
void register_throwing(loadkit::Registrar& r) {
  r.add_architecture("ThrowingForCausalLM", nullptr);
  throw std::runtime_error("cannot register: config table corrupt");
}
}  // namespace

LOADKIT_PLUGIN("throwing", "0.1.0", register_throwing)
