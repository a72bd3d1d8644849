#include "reload/module_step.h"

#include <ATen/ATen.h>

#include "loadkit/error.h"

namespace loadkit::reload {

namespace {

bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides() &&
         a.scalar_type() == b.scalar_type();
}

/// `produced` into `kernel` (same storage kept), unless processing wrote it there already.
void copy_into(at::Tensor& kernel, const at::Tensor& produced, const std::string& name) {
  if (same_tensor(kernel, produced)) return;  // processing wrote in place
  if (kernel.sizes() != produced.sizes() || kernel.scalar_type() != produced.scalar_type())
    fail(ErrorKind::Other, "reprocessing '", name, "' produced ", shape_str(produced.sizes()), " ",
         c10::toString(produced.scalar_type()), ", the kernel tensor is ", shape_str(kernel.sizes()), " ",
         c10::toString(kernel.scalar_type()));
  kernel.copy_(produced);
}

/// Lets go of the load format materialize() made (parameters that are kernel objects keep theirs).
void dematerialize(ModuleRecord& mod) {
  for (auto& rec : mod.params)
    if (mod.module->find_param(rec.name) != rec.original.get()) rec.original->data = meta_tensor(rec.shape, rec.dtype);
  mod.materialized = false;
}

/// The kernel objects back in the module, holding their kernel storage.
void place_kernel(ModuleRecord& mod) {
  Module& module = *mod.module;
  std::vector<std::string> current;
  for (const auto& [name, p] : module.parameters()) current.push_back(name);
  for (const auto& name : current) module.remove_parameter(name);
  for (size_t k = 0; k < mod.kernel.objects.size(); ++k) {
    auto& [name, object] = mod.kernel.objects[k];
    object->data = mod.kernel.data[k].second;
    module.add_parameter(name, object);
  }
  for (auto& [name, b] : mod.kernel.buffers) module.add_buffer(name, b);
}

}  // namespace

void take_kernel(ModuleRecord& mod) {
  Module& module = *mod.module;
  mod.kernel.objects = module.parameters();
  mod.kernel.data.clear();
  for (auto& [name, p] : mod.kernel.objects) mod.kernel.data.emplace_back(name, p->data);
  mod.kernel.buffers = module.buffers();
  if (!mod.transforms) return;
  for (auto& [name, p] : mod.kernel.objects) module.remove_parameter(name);
  for (auto& rec : mod.params) {
    rec.original->data = meta_tensor(rec.shape, rec.dtype);
    module.add_parameter(rec.name, rec.original);
  }
}

void materialize(ModuleRecord& mod, const c10::Device& device) {
  for (auto& rec : mod.params) rec.original->data = at::empty(rec.shape, at::TensorOptions().dtype(rec.dtype).device(device));
  mod.materialized = true;
}

void process_into_kernel(ModuleRecord& mod, const c10::Device& device) {
  Module& module = *mod.module;
  if (!mod.materialized) {
    materialize(mod, device);
    for (const KeptCall& call : mod.calls) {
      ParamRecord& rec = mod.params[call.param];
      rec.loader(*rec.original, call.loaded, call.shard);
    }
  }
  mod.calls.clear();
  // An update's replayed writes (update_plan.h), kept like calls: into the load format now.
  std::vector<WeightWrite> writes;
  for (KeptWrite& w : mod.writes)
    writes.push_back({w.into.view_of(mod.params[w.into.param].original->data), std::move(w.src)});
  mod.writes.clear();
  apply_writes(writes);
  KernelTargets targets(mod.kernel.data.begin(), mod.kernel.data.end());
  module.process_weights_after_loading(targets);
  for (auto& [name, kernel] : mod.kernel.data) {
    Parameter* produced = module.find_param(name);
    if (!produced) fail(ErrorKind::Other, "processing module '", mod.name, "' did not produce parameter '", name, "'");
    copy_into(kernel, produced->data, mod.name + "." + name);
  }
  for (auto& [name, kernel] : mod.kernel.buffers)
    if (at::Tensor* produced = module.find_buffer(name)) copy_into(kernel, *produced, mod.name + "." + name);
  place_kernel(mod);
  // Free the load format at once, except parameters that processing kept as they were (a quantized
  // layer's bias): those objects are kernel parameters again, holding kernel storage.
  dematerialize(mod);
  mod.done = true;
}

void put_back_kernel(ModuleRecord& mod) {
  mod.calls.clear();
  mod.writes.clear();
  if (!mod.transforms) return;
  place_kernel(mod);
  if (mod.materialized) dematerialize(mod);
}

void restore_loaders(ModuleRecord& mod) {
  for (auto& rec : mod.params) {
    rec.original->loader = rec.loader;
    if (Parameter* p = mod.module->find_param(rec.name)) p->loader = rec.loader;
  }
}

}  // namespace loadkit::reload
