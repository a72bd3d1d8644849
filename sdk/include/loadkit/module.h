#pragma once
/// \file
/// The model tree: modules with named children, parameters and buffers.
///
/// Mirrors an inference engine's `nn.Module` just enough for loading: a
/// `Parameter` carries its tensor, the weight loader that knows how to write a
/// checkpoint tensor (or a tensor-parallel shard of it) into that tensor, and
/// its sharding facts. Names and nesting follow vLLM's
/// (`model.layers.0.self_attn.qkv_proj.weight`).
///
/// Parameters are held by `shared_ptr` so that two modules can share one (tied
/// embeddings); `named_parameters()` lists a shared parameter once, under the
/// first name found, as PyTorch does.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace loadkit {

class Parameter;

/// Which part of a fused parameter a checkpoint tensor fills.
struct ShardId {
  std::string name;     ///< "q"/"k"/"v", "0"/"1", "w1"/"w2"/"w3"; empty: the whole parameter
  int64_t expert = -1;  ///< expert index of a stacked MoE parameter, -1 otherwise

  bool empty() const { return name.empty() && expert < 0; }
  std::string str() const;  ///< for messages: "q", "expert 3 w1", "(whole)"
};

/// Writes `loaded` — or this rank's tensor-parallel shard of it — into
/// `param.data` and returns the number of elements of `param.data` it wrote.
/// Throws `loadkit::Error` (Input) when the shapes do not fit; in that case it
/// has written nothing. Must only read `loaded`.
using WeightLoader = std::function<int64_t(Parameter& param, const at::Tensor& loaded, const ShardId& shard)>;

/// Sharding facts of a parameter (what vLLM keeps as parameter attributes).
struct ShardingInfo {
  int64_t output_dim = -1;  ///< dim split across ranks by column-parallel layers, -1 if none
  int64_t input_dim = -1;   ///< dim split across ranks by row-parallel layers, -1 if none
  bool vocab_rows = false;  ///< dim 0 are (padded) vocabulary rows
  int tp_rank = 0;
  int tp_size = 1;
};

class Parameter {
 public:
  Parameter(at::Tensor data, WeightLoader loader, ShardingInfo sharding = {});

  at::Tensor data;          ///< current storage: load format until processed, kernel format after
  WeightLoader loader;      ///< how checkpoint tensors get into `data`
  ShardingInfo sharding;
  /// Elements a complete checkpoint writes into `data`; smaller than `data.numel()`
  /// when the parameter is padded (a vocabulary rounded up to a multiple of 64).
  int64_t expected_load_numel;
  /// Elements written by loaders since the counter was last reset (capped at numel).
  int64_t loaded_numel = 0;
  /// The shards (`ShardId::str()`) written since then, each once: a missing-weights
  /// report names the checkpoint tensors a fused parameter still lacks from them.
  std::vector<std::string> loaded_shards;
};

/// Kernel-format tensors that a reload wants processing to write into, by
/// parameter name: processing that honours them writes its results in place
/// (same storage, so captured CUDA graphs stay valid, and no second copy of the
/// layer is allocated). Empty on a fresh load.
using KernelTargets = std::map<std::string, at::Tensor, std::less<>>;

/// Copies `loaded` into all of `param.data`; shapes must be equal.
WeightLoader default_weight_loader();

/// Throws an Input error "shape [a, b] does not fit <what> [c, d]" unless equal.
void check_shape(const at::Tensor& loaded, at::IntArrayRef expected, std::string_view what);

/// Formats a shape as "[a, b]".
std::string shape_str(at::IntArrayRef shape);

class Module {
 public:
  explicit Module(std::string type_name);
  virtual ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  /// The class name used in messages, e.g. "LlamaDecoderLayer".
  const std::string& type_name() const { return type_name_; }

  /// Adds a child; returns it for chaining (`auto& norm = add_module("norm", make_shared<RMSNorm>(...))`).
  template <class M>
  M& add_module(std::string name, std::shared_ptr<M> child) {
    M& ref = *child;
    add_child(std::move(name), std::shared_ptr<Module>(std::move(child)));
    return ref;
  }
  Parameter& add_parameter(std::string name, at::Tensor data, WeightLoader loader = default_weight_loader(),
                           ShardingInfo sharding = {});
  /// Registers an existing parameter under a second owner (weight tying).
  Parameter& add_parameter(std::string name, std::shared_ptr<Parameter> shared);
  void add_buffer(std::string name, at::Tensor data);
  /// Removes a parameter (quantization processing replaces load-format parameters).
  void remove_parameter(std::string_view name);
  void remove_buffer(std::string_view name);

  Parameter& param(std::string_view name);
  const Parameter& param(std::string_view name) const;
  Parameter* find_param(std::string_view name);
  std::shared_ptr<Parameter> shared_param(std::string_view name) const;
  at::Tensor& buffer(std::string_view name);
  at::Tensor* find_buffer(std::string_view name);
  Module* find_child(std::string_view name) const;

  const std::vector<std::pair<std::string, std::shared_ptr<Module>>>& children() const { return children_; }
  const std::vector<std::pair<std::string, std::shared_ptr<Parameter>>>& parameters() const { return params_; }
  const std::vector<std::pair<std::string, at::Tensor>>& buffers() const { return buffers_; }

  /// Every parameter below this module, qualified with `prefix`, each one once.
  std::vector<std::pair<std::string, Parameter*>> named_parameters(const std::string& prefix = "") const;
  /// This module (named `prefix`) and every module below it, depth first, each once.
  std::vector<std::pair<std::string, Module*>> named_modules(const std::string& prefix = "") const;

  /// True for attention-like modules, which are processed after all others.
  virtual bool is_attention_like() const { return false; }
  /// True when processing changes this module's own parameters (their shapes,
  /// dtypes or set); a reload then restores the load format around it. When
  /// false, load format is kernel format and a reload writes straight into it.
  virtual bool transforms_weights() const { return false; }
  /// Converts this module's own parameters from load format to kernel format
  /// once all of them are loaded (quantization, repacking). Writes into
  /// `targets` where it can (see KernelTargets). Default: nothing.
  virtual void process_weights_after_loading(const KernelTargets& targets = {}) { (void)targets; }

 private:
  void add_child(std::string name, std::shared_ptr<Module> child);

  std::string type_name_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  std::vector<std::pair<std::string, std::shared_ptr<Parameter>>> params_;
  std::vector<std::pair<std::string, at::Tensor>> buffers_;
};

/// A numbered list of children named "0", "1", … (PyTorch's ModuleList).
class ModuleList : public Module {
 public:
  ModuleList() : Module("ModuleList") {}
  template <class M>
  M& append(std::shared_ptr<M> child) {
    return add_module(std::to_string(size_++), std::move(child));
  }
  size_t size() const { return size_; }

 private:
  size_t size_ = 0;
};

}  // namespace loadkit
