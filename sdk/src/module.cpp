#include "loadkit/module.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <unordered_set>

#include "loadkit/error.h"
#include "loadkit/weight_writes.h"

namespace loadkit {

std::string ShardId::str() const {
  if (empty()) return "(whole)";
  if (expert < 0) return name;
  return cat("expert ", expert, name.empty() ? "" : " ", name);
}

Parameter::Parameter(at::Tensor data_, WeightLoader loader_, ShardingInfo sharding_)
    : data(std::move(data_)),
      loader(std::move(loader_)),
      sharding(sharding_),
      expected_load_numel(data.defined() ? data.numel() : 0) {}

std::string shape_str(at::IntArrayRef shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += cat(i ? ", " : "", shape[i]);
  return out + "]";
}

void check_shape(const at::Tensor& loaded, at::IntArrayRef expected, std::string_view what) {
  if (loaded.sizes() != expected)
    fail(ErrorKind::Input, "shape ", shape_str(loaded.sizes()), " does not fit ", what, " ", shape_str(expected));
}

WeightLoader default_weight_loader() {
  return describing_writes([](Parameter& param, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
    if (!shard.empty()) fail(ErrorKind::Input, "parameter takes no shard id, got '", shard.str(), "'");
    check_shape(loaded, param.data.sizes(), "parameter");
    copy_weight(param.data, loaded);
    return param.data.numel();
  });
}

Module::Module(std::string type_name) : type_name_(std::move(type_name)) {}
Module::~Module() = default;

namespace {
template <class Vec>
auto find_named(Vec& vec, std::string_view name) {
  return std::find_if(vec.begin(), vec.end(), [&](const auto& entry) { return entry.first == name; });
}
}  // namespace

void Module::add_child(std::string name, std::shared_ptr<Module> child) {
  if (find_named(children_, name) != children_.end() || find_named(params_, name) != params_.end())
    fail(ErrorKind::Other, type_name_, ": duplicate member '", name, "'");
  children_.emplace_back(std::move(name), std::move(child));
}

Parameter& Module::add_parameter(std::string name, at::Tensor data, WeightLoader loader, ShardingInfo sharding) {
  return add_parameter(std::move(name),
                       std::make_shared<Parameter>(std::move(data), std::move(loader), sharding));
}

Parameter& Module::add_parameter(std::string name, std::shared_ptr<Parameter> shared) {
  if (find_named(children_, name) != children_.end() || find_named(params_, name) != params_.end())
    fail(ErrorKind::Other, type_name_, ": duplicate member '", name, "'");
  params_.emplace_back(std::move(name), std::move(shared));
  return *params_.back().second;
}

void Module::add_buffer(std::string name, at::Tensor data) {
  if (auto it = find_named(buffers_, name); it != buffers_.end()) {
    it->second = std::move(data);
    return;
  }
  buffers_.emplace_back(std::move(name), std::move(data));
}

void Module::remove_parameter(std::string_view name) {
  if (auto it = find_named(params_, name); it != params_.end()) params_.erase(it);
}

void Module::remove_buffer(std::string_view name) {
  if (auto it = find_named(buffers_, name); it != buffers_.end()) buffers_.erase(it);
}

Parameter* Module::find_param(std::string_view name) {
  auto it = find_named(params_, name);
  return it == params_.end() ? nullptr : it->second.get();
}

Parameter& Module::param(std::string_view name) {
  if (Parameter* p = find_param(name)) return *p;
  fail(ErrorKind::Other, type_name_, " has no parameter '", name, "'");
}

const Parameter& Module::param(std::string_view name) const { return const_cast<Module*>(this)->param(name); }

std::shared_ptr<Parameter> Module::shared_param(std::string_view name) const {
  auto it = find_named(params_, name);
  if (it == params_.end()) fail(ErrorKind::Other, type_name_, " has no parameter '", name, "'");
  return it->second;
}

at::Tensor* Module::find_buffer(std::string_view name) {
  auto it = find_named(buffers_, name);
  return it == buffers_.end() ? nullptr : &it->second;
}

at::Tensor& Module::buffer(std::string_view name) {
  if (at::Tensor* b = find_buffer(name)) return *b;
  fail(ErrorKind::Other, type_name_, " has no buffer '", name, "'");
}

Module* Module::find_child(std::string_view name) const {
  auto it = find_named(children_, name);
  return it == children_.end() ? nullptr : it->second.get();
}

std::vector<std::pair<std::string, Module*>> Module::named_modules(const std::string& prefix) const {
  std::vector<std::pair<std::string, Module*>> out;
  std::unordered_set<const Module*> seen;
  auto walk = [&](auto&& self, const Module& m, const std::string& name) -> void {
    if (!seen.insert(&m).second) return;
    out.emplace_back(name, const_cast<Module*>(&m));
    for (const auto& [child_name, child] : m.children_)
      self(self, *child, name.empty() ? child_name : name + "." + child_name);
  };
  walk(walk, *this, prefix);
  return out;
}

std::vector<std::pair<std::string, Parameter*>> Module::named_parameters(const std::string& prefix) const {
  std::vector<std::pair<std::string, Parameter*>> out;
  std::unordered_set<const Parameter*> seen;
  for (const auto& [module_name, module] : named_modules(prefix))
    for (const auto& [name, p] : module->params_)
      if (seen.insert(p.get()).second) out.emplace_back(module_name.empty() ? name : module_name + "." + name, p.get());
  return out;
}

}  // namespace loadkit
