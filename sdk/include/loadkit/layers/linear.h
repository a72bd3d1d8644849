#pragma once
/// \file
/// Tensor-parallel linear layers with vLLM's names, shapes and weight loaders.
///
/// Every loader narrows the checkpoint tensor to this rank's shard
/// (`ctx.tp_rank` of `ctx.tp_size`), checks the full checkpoint shape first
/// (a tensor that is too large is an error, never silently cut), and returns
/// the number of elements written.
///
/// ## Block-scaled parameters
/// A block-quantized weight comes with parameters whose entries each stand
/// for a `block_rows` x `block_cols` block of the weight (block fp8's
/// `weight_scale_inv`). `block_loader` gives their loader: it shards exactly
/// as the weight's loader does, in units of blocks. The rule that makes that
/// one mechanism for every layer: **each output part starts a fresh block** —
/// a fused layer's parts (q/k/v, gate/up) are separate checkpoint tensors,
/// each quantized with its own blocks — so a blocked parameter has, for each
/// part in order, ceil(part rows / block_rows) rows, and ceil(input /
/// block_cols) columns. A tensor-parallel split must fall on block
/// boundaries (a rank's slice of a split part, or of a row-parallel input, a
/// multiple of the block): otherwise the loader `block_loader` returns fails
/// with a Usage error when a tensor arrives (naming the parameter), as vLLM
/// refuses such a split.

#include <ATen/core/Tensor.h>

#include <memory>
#include <vector>

#include "loadkit/model_context.h"
#include "loadkit/module.h"
#include "loadkit/quant_method.h"

namespace loadkit {

struct LinearOptions {
  bool bias = false;
  /// Whether the model's quantization (if any) applies to this layer. Plugins
  /// say false for layers that must stay in the model dtype (MoE router, …).
  bool quantize = true;
};

class LinearBase : public Module {
 public:
  at::Tensor forward(const at::Tensor& x);
  bool transforms_weights() const override { return method_->transforms_weights(); }
  void process_weights_after_loading(const KernelTargets& targets = {}) override;

  const LinearShape& shape() const { return shape_; }
  LinearMethod& method() { return *method_; }
  const ModelContext& context() const { return ctx_; }
  /// This rank's output rows of each part, in order (one part unless fused).
  virtual std::vector<int64_t> output_parts() const { return {shape_.output_size}; }
  /// Which part (an index into output_parts()) a checkpoint tensor with shard id `shard` fills;
  /// kFused: every part, fused in one tensor. Input error for a shard id the layer does not take.
  virtual size_t part_of(const ShardId& shard) const;
  static constexpr size_t kFused = static_cast<size_t>(-1);
  /// The loader of a blocked parameter of this layer (see the file comment):
  /// [Σ ceil(part / block_rows), ceil(input / block_cols)] per rank. Call it
  /// from `LinearMethod::create_weights`. The loader fails (Usage) when a
  /// tensor-parallel split cuts a block.
  virtual WeightLoader block_loader(int64_t block_rows, int64_t block_cols);
  /// The loader of a parameter whose dim 0 is the layer's output rows and is sharded as the
  /// bias is (per-output-channel scales): split with the rows by column-parallel layers, whole
  /// on every rank of row-parallel ones. Valid from `LinearMethod::create_weights` on.
  const WeightLoader& output_row_loader() const { return output_row_loader_; }
  /// Whether the model's quantization applies to this layer (LinearOptions::quantize).
  bool quantizable() const { return quantizable_; }
  /// Gives the layer `method` in place of the one it was built with, recreating the
  /// parameters the method makes (the bias keeps its tensor). Only before anything is
  /// loaded: `assign_quant_methods` (quant_method.h) calls it.
  void use_method(std::shared_ptr<LinearMethod> method);

 protected:
  LinearBase(std::string type_name, const ModelContext& ctx, LinearShape shape, const LinearOptions& options);
  /// Creates "weight" through the method, and "bias" ([output] per rank) when asked.
  void create(WeightLoader weight_loader, ShardingInfo weight_sharding, WeightLoader bias_loader,
              ShardingInfo bias_sharding, bool bias);
  /// Output of the local matmul; row-parallel layers reduce before adding the bias.
  virtual at::Tensor finish(at::Tensor y) { return y; }
  bool bias_after_reduce_ = false;

  ModelContext ctx_;
  LinearShape shape_;
  std::shared_ptr<LinearMethod> method_;
  WeightLoader output_row_loader_;
  bool quantizable_ = true;
  WeightLoader weight_loader_;  ///< what create() gave the method, for use_method()
  ShardingInfo weight_sharding_;
};

/// Weight [output/tp, input]; the output dimension is split across ranks.
class ColumnParallelLinear : public LinearBase {
 public:
  ColumnParallelLinear(int64_t input_size, int64_t output_size, const ModelContext& ctx, LinearOptions options = {});
  std::vector<int64_t> output_parts() const override { return layout_.rank_sizes; }
  WeightLoader block_loader(int64_t block_rows, int64_t block_cols) override;

 protected:
  /// How the output rows of each fused part are split across ranks.
  struct Layout {
    std::vector<int64_t> total_sizes;  ///< rows of each part in the checkpoint (all ranks)
    std::vector<int64_t> rank_sizes;   ///< rows of each part on this rank
    std::vector<int64_t> shard_index;  ///< which slice of the part this rank holds
  };
  /// Each part split evenly over the ranks.
  static Layout even_layout(std::vector<int64_t> output_sizes, const ModelContext& ctx);
  ColumnParallelLinear(std::string type_name, int64_t input_size, Layout layout, const ModelContext& ctx,
                       const LinearOptions& options);
  /// Loads `loaded` into `param`, whose rows are the layout's in units of `unit` rows (1: the
  /// weight itself; a block: a blocked parameter, each part rounded up to whole blocks).
  int64_t load(Parameter& param, const at::Tensor& loaded, const ShardId& shard, int64_t unit);
  /// Writes this rank's rows of part `index` (checkpoint rows: the part's total) into their place.
  int64_t load_part(Parameter& param, const at::Tensor& loaded, size_t index, int64_t unit);
  /// For a tensor holding all parts fused (no shard id): splits it and loads each part.
  int64_t load_fused(Parameter& param, const at::Tensor& loaded, int64_t unit);

  Layout layout_;
};

/// gate_proj and up_proj stacked: shard ids "0", "1".
class MergedColumnParallelLinear : public ColumnParallelLinear {
 public:
  MergedColumnParallelLinear(int64_t input_size, std::vector<int64_t> output_sizes, const ModelContext& ctx,
                             LinearOptions options = {});
  size_t part_of(const ShardId& shard) const override;
};

/// q, k and v stacked: shard ids "q", "k", "v". When tp_size exceeds the
/// number of kv heads, each kv head is replicated on tp_size / kv_heads ranks.
class QKVParallelLinear : public ColumnParallelLinear {
 public:
  QKVParallelLinear(int64_t hidden_size, int64_t head_size, int64_t total_num_heads, int64_t total_num_kv_heads,
                    const ModelContext& ctx, LinearOptions options = {});
  int64_t num_heads() const { return layout_.rank_sizes[0] / head_size_; }     ///< on this rank
  int64_t num_kv_heads() const { return layout_.rank_sizes[1] / head_size_; }  ///< on this rank
  int64_t head_size() const { return head_size_; }
  size_t part_of(const ShardId& shard) const override;

 protected:

 private:
  static Layout qkv_layout(int64_t head_size, int64_t total_num_heads, int64_t total_num_kv_heads,
                           const ModelContext& ctx);
  int64_t head_size_;
};

/// Weight [output, input/tp]; the input dimension is split and the partial
/// outputs summed across ranks before the (unsplit) bias is added.
class RowParallelLinear : public LinearBase {
 public:
  RowParallelLinear(int64_t input_size, int64_t output_size, const ModelContext& ctx, LinearOptions options = {});
  WeightLoader block_loader(int64_t block_rows, int64_t block_cols) override;

 protected:
  at::Tensor finish(at::Tensor y) override;

 private:
  /// Loads `loaded` ([output, input] in units of `unit_cols` input columns) as this rank's columns.
  int64_t load(Parameter& p, const at::Tensor& loaded, const ShardId& shard, int64_t unit_cols) const;
  int64_t full_input_;
};

/// Weight [output, input] on every rank.
class ReplicatedLinear : public LinearBase {
 public:
  ReplicatedLinear(int64_t input_size, int64_t output_size, const ModelContext& ctx, LinearOptions options = {});
};

/// silu(x[..., :d]) * x[..., d:], the activation after a merged gate/up projection.
at::Tensor silu_and_mul(const at::Tensor& x);
/// gelu(x[..., :d], tanh approximation) * x[..., d:].
at::Tensor gelu_tanh_and_mul(const at::Tensor& x);

}  // namespace loadkit
