#pragma once
/// \file
/// Mixture-of-experts layer with vLLM's FusedMoE parameter layout.
///
/// The routed experts' weights are stacked: `w13_weight` [E, 2 * I, H] holds
/// each expert's gate projection (rows [0, I), checkpoint "experts.N.gate_proj",
/// shard "w1") and up projection (rows [I, 2I), "up_proj", shard "w3");
/// `w2_weight` [E, H, I] its down projection ("down_proj", shard "w2"). Under
/// tensor parallelism every rank holds every expert and the slice
/// [rank * I/tp, (rank + 1) * I/tp) of the intermediate dimension, as vLLM does
/// without expert parallelism; the partial outputs are summed across ranks.
///
/// Block-quantized experts (block fp8) come with blocked parameters whose entries
/// each stand for a block of an expert's weight, as linear.h describes for linear
/// layers: `block_loader` loads them, gate and up each starting a fresh block
/// ([E, 2 * ceil(I / bn), ceil(H / bk)] for w13, [E, ceil(H / bn), ceil(I / bk)]
/// for w2, per rank), and its loader refuses (Usage) a tensor-parallel split of I that cuts a block.
///
/// How the experts are stored (plain or quantized per expert) is a
/// `FusedMoEMethod`'s business, chosen like a linear layer's method: through
/// `QuantConfig::moe_method(prefix)` when the layer is quantizable.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

class FusedMoE;

/// How router logits become expert scores.
enum class MoEScoring {
  Softmax,  ///< softmax over the experts (Qwen-MoE, DeepSeek-V2)
  Sigmoid,  ///< each expert's sigmoid on its own (DeepSeek-V3)
};

/// Routing and sizes of a FusedMoE layer (vLLM's FusedMoE arguments).
///
/// Routing, in order (select_experts):
///   1. scores = `scoring`(router logits), float32;
///   2. choice = scores + the correction bias when `score_correction_bias` (else scores);
///   3. with groups: a group's score is its best choice, or the sum of its two best under the
///      correction bias; experts outside the `topk_group` best groups drop out;
///   4. the `top_k` best choices are the experts; their weights are their *scores* (the bias
///      chooses, it never weighs), renormalized to sum to 1 when `renormalize`, then times
///      `routed_scaling_factor`.
struct FusedMoEOptions {
  int64_t num_experts = 0;
  int64_t top_k = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  ///< per expert, before the tensor-parallel split
  MoEScoring scoring = MoEScoring::Softmax;
  /// Top-k weights rescaled to sum to 1 (config `norm_topk_prob`).
  bool renormalize = false;
  /// > 0: group-limited routing: experts form this many groups, a token only
  /// goes to experts of its `topk_group` best groups.
  int64_t num_expert_group = 0;
  int64_t topk_group = 0;
  /// DeepSeek-V3's noaux_tc: a float32 bias per expert (the router's
  /// `e_score_correction_bias`, passed to forward) is added to the scores to choose experts,
  /// and a group scores the sum of its two best biased scores (so groups hold >= 2 experts).
  bool score_correction_bias = false;
  /// Multiplies the routing weights (after renormalization).
  double routed_scaling_factor = 1.0;
  /// Whether the model's quantization (if any) applies to the experts.
  bool quantize = true;
};

/// Per-rank sizes of the stacked expert weights.
struct MoEShape {
  int64_t num_experts = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  ///< this rank's share
};

/// How a FusedMoE layer stores, processes and reads its expert weights.
class FusedMoEMethod {
 public:
  virtual ~FusedMoEMethod() = default;
  virtual std::string name() const = 0;
  /// Adds the load-format parameters "w13_weight" [E, 2I, H] and "w2_weight"
  /// [E, H, I] (`ctx.dtype`) to `layer`, with `loader` and the given sharding.
  virtual void create_weights(FusedMoE& layer, const MoEShape& shape, WeightLoader loader, ShardingInfo w13_sharding,
                              ShardingInfo w2_sharding, const ModelContext& ctx) = 0;
  /// True when processing changes the layer's parameters.
  virtual bool transforms_weights() const = 0;
  /// Converts the loaded parameters to kernel format, writing into `targets`
  /// (same names, shapes and dtypes as its own results) when given.
  virtual void process_weights_after_loading(FusedMoE& layer, const KernelTargets& targets) = 0;
  /// Expert `expert`'s weights in `dtype`, from kernel format: {w13 [2I, H], w2 [H, I]}.
  virtual std::pair<at::Tensor, at::Tensor> expert_weights(FusedMoE& layer, int64_t expert,
                                                           at::ScalarType dtype) = 0;
  /// Device bytes processing allocates for a layer of `shape` beyond its
  /// load-format parameters and its targets, at most at any one time: what a
  /// reload sets aside next to the layer while rebuilding it (see
  /// LinearMethod::process_scratch_bytes). Must not throw. Default: 0.
  virtual uint64_t process_scratch_bytes(const MoEShape& shape, const ModelContext& ctx) const {
    (void)shape;
    (void)ctx;
    return 0;
  }
};

/// Plain stacked weights in the model dtype; processing does nothing.
std::shared_ptr<FusedMoEMethod> unquantized_moe_method();

/// Top-k expert selection from router logits [n, E], as FusedMoEOptions describes it:
/// {weights [n, top_k] float32, expert ids [n, top_k] int64}. `correction_bias` [E] is
/// required exactly when `options.score_correction_bias`.
std::pair<at::Tensor, at::Tensor> select_experts(const at::Tensor& router_logits, const FusedMoEOptions& options,
                                                 const at::Tensor& correction_bias = {});

class FusedMoE : public Module {
 public:
  FusedMoE(const FusedMoEOptions& options, const ModelContext& ctx);

  /// x [n, H], router logits [n, E] → Σ over the chosen experts of weight · expert(x),
  /// in x's dtype, summed over the tensor-parallel ranks. `correction_bias`: see select_experts.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& correction_bias = {});

  bool transforms_weights() const override { return method_->transforms_weights(); }
  void process_weights_after_loading(const KernelTargets& targets = {}) override;

  const FusedMoEOptions& options() const { return options_; }
  const MoEShape& shape() const { return shape_; }
  FusedMoEMethod& method() { return *method_; }
  const ModelContext& context() const { return ctx_; }
  /// The loader of a blocked parameter of the experts (see the file comment), for
  /// `FusedMoEMethod::create_weights`. Its loader fails (Usage) when a tensor-parallel split cuts a block.
  WeightLoader block_loader(int64_t block_rows, int64_t block_cols) const;
  /// Gives the experts `method` (null: unquantized) in place of the one they were built with,
  /// recreating their parameters. Only before anything is loaded: `assign_quant_methods`
  /// (quant_method.h) calls it.
  void use_method(std::shared_ptr<FusedMoEMethod> method);

 private:
  /// Expert shards "w1"/"w3" (into w13) and "w2"; "w13"/"w2" without an expert: all
  /// experts stacked (transformers 5: gate_up_proj, down_proj); without a shard id the
  /// whole per-rank stacked tensor.
  /// `unit_rows` x `unit_cols`: the parameter's entries in elements of the weight (1 x 1 for the weight itself).
  /// The method's parameters, with this layer's loader and shardings.
  void create_weights();
  int64_t load(Parameter& param, const at::Tensor& loaded, const ShardId& shard, int64_t unit_rows = 1,
               int64_t unit_cols = 1) const;

  FusedMoEOptions options_;
  ModelContext ctx_;
  MoEShape shape_;
  std::shared_ptr<FusedMoEMethod> method_;
};

}  // namespace loadkit
