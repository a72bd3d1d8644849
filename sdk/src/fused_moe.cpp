#include "loadkit/layers/fused_moe.h"

#include <ATen/ATen.h>

#include <limits>

#include "loadkit/error.h"
#include "loadkit/layers/linear.h"
#include "loadkit/quant_method.h"
#include "loadkit/weight_writes.h"

namespace loadkit {

namespace {

class UnquantizedMoEMethod final : public FusedMoEMethod {
 public:
  std::string name() const override { return "none"; }
  void create_weights(FusedMoE& layer, const MoEShape& s, WeightLoader loader, ShardingInfo w13_sharding,
                      ShardingInfo w2_sharding, const ModelContext& ctx) override {
    layer.add_parameter("w13_weight", at::empty({s.num_experts, 2 * s.intermediate_size, s.hidden_size}, ctx.options()),
                        loader, w13_sharding);
    layer.add_parameter("w2_weight", at::empty({s.num_experts, s.hidden_size, s.intermediate_size}, ctx.options()),
                        loader, w2_sharding);
  }
  bool transforms_weights() const override { return false; }
  void process_weights_after_loading(FusedMoE&, const KernelTargets&) override {}
  std::pair<at::Tensor, at::Tensor> expert_weights(FusedMoE& layer, int64_t expert, at::ScalarType dtype) override {
    return {layer.param("w13_weight").data.select(0, expert).to(dtype),
            layer.param("w2_weight").data.select(0, expert).to(dtype)};
  }
};

}  // namespace

std::shared_ptr<FusedMoEMethod> unquantized_moe_method() {
  static auto method = std::make_shared<UnquantizedMoEMethod>();
  return method;
}

std::pair<at::Tensor, at::Tensor> select_experts(const at::Tensor& router_logits, const FusedMoEOptions& o,
                                                 const at::Tensor& correction_bias) {
  if (o.score_correction_bias != correction_bias.defined())
    fail(ErrorKind::Other, "select_experts: a score correction bias ",
         o.score_correction_bias ? "is required and was not given" : "was given to routing that takes none");
  const at::Tensor logits = router_logits.to(at::kFloat);
  const at::Tensor scores = o.scoring == MoEScoring::Sigmoid ? at::sigmoid(logits) : at::softmax(logits, -1);
  at::Tensor choice = o.score_correction_bias ? scores + correction_bias.to(at::kFloat) : scores;
  if (o.num_expert_group > 0) {
    // Experts outside the best `topk_group` groups are out of the race: masked to -inf, below any
    // score, so that a biased score below zero still never loses to a masked expert.
    const int64_t n = choice.size(0), groups = o.num_expert_group;
    at::Tensor grouped = choice.view({n, groups, -1});
    at::Tensor group_scores =
        o.score_correction_bias ? std::get<0>(at::topk(grouped, 2, -1)).sum(-1) : grouped.amax(-1);
    at::Tensor best_groups = std::get<1>(at::topk(group_scores, o.topk_group, -1));
    at::Tensor group_mask = at::zeros_like(group_scores, at::kBool).scatter_(1, best_groups, true);
    at::Tensor expert_mask = group_mask.unsqueeze(-1).expand({n, groups, o.num_experts / groups}).reshape({n, -1});
    choice = choice.masked_fill(expert_mask.logical_not(), -std::numeric_limits<float>::infinity());
  }
  at::Tensor ids = std::get<1>(at::topk(choice, o.top_k, -1));
  // The weights are the chosen experts' scores, whatever chose them.
  at::Tensor weights = scores.gather(1, ids);
  if (o.renormalize) weights = weights / weights.sum(-1, /*keepdim=*/true);
  if (o.routed_scaling_factor != 1.0) weights = weights * o.routed_scaling_factor;
  return {weights, ids};
}

FusedMoE::FusedMoE(const FusedMoEOptions& options, const ModelContext& ctx)
    : Module("FusedMoE"), options_(options), ctx_(ctx) {
  const auto& o = options_;
  if (o.num_experts <= 0 || o.top_k <= 0 || o.top_k > o.num_experts)
    fail(ErrorKind::Input, "FusedMoE: ", o.top_k, " experts per token out of ", o.num_experts);
  if (o.num_expert_group > 0 &&
      (o.num_experts % o.num_expert_group != 0 || o.topk_group <= 0 || o.topk_group > o.num_expert_group ||
       o.top_k > o.topk_group * (o.num_experts / o.num_expert_group) ||
       (o.score_correction_bias && o.num_experts / o.num_expert_group < 2)))
    fail(ErrorKind::Input, "FusedMoE: ", o.num_experts, " experts cannot route ", o.top_k, " per token through ",
         o.topk_group, " of ", o.num_expert_group, " groups", o.score_correction_bias ? " (of at least 2 experts)" : "");
  if (o.intermediate_size % ctx.tp_size != 0)
    fail(ErrorKind::Usage, "tensor parallel size ", ctx.tp_size, " does not divide the expert intermediate size (",
         o.intermediate_size, ")");
  shape_ = {o.num_experts, o.hidden_size, o.intermediate_size / ctx.tp_size};
  // The layer's name is not known yet: the method most layers get, until assign_quant_methods asks by name.
  method_ = o.quantize && ctx.quant ? ctx.quant->moe_method(LayerPrefix{}) : nullptr;
  if (!method_) method_ = unquantized_moe_method();
  create_weights();
}

void FusedMoE::create_weights() {
  WeightLoader loader = describing_writes([this](Parameter& param, const at::Tensor& loaded, const ShardId& shard) {
    return load(param, loaded, shard);
  });
  method_->create_weights(*this, shape_, loader, ShardingInfo{.output_dim = 1, .tp_rank = ctx_.tp_rank, .tp_size = ctx_.tp_size},
                          ShardingInfo{.input_dim = 2, .tp_rank = ctx_.tp_rank, .tp_size = ctx_.tp_size}, ctx_);
}

void FusedMoE::use_method(std::shared_ptr<FusedMoEMethod> method) {
  if (!method) method = unquantized_moe_method();
  if (method == method_) return;
  std::vector<std::string> names;
  for (const auto& [name, param] : parameters()) names.push_back(name);
  for (const std::string& name : names) remove_parameter(name);
  method_ = std::move(method);
  create_weights();
}

WeightLoader FusedMoE::block_loader(int64_t block_rows, int64_t block_cols) const {
  // Checked when a tensor arrives: the loader's error then names the parameter.
  return describing_writes([this, block_rows, block_cols](Parameter& param, const at::Tensor& loaded,
                                                          const ShardId& shard) {
    if (ctx_.tp_size > 1 && (shape_.intermediate_size % block_rows != 0 || shape_.intermediate_size % block_cols != 0))
      fail(ErrorKind::Usage, "tensor parallel size ", ctx_.tp_size, " cuts a ", block_rows, "x", block_cols,
           " quantization block of FusedMoE's expert intermediate size (", shape_.intermediate_size,
           " per rank); block-quantized experts need every rank's slice to be whole blocks");
    return load(param, loaded, shard, block_rows, block_cols);
  });
}

int64_t FusedMoE::load(Parameter& param, const at::Tensor& loaded, const ShardId& shard, int64_t unit_rows,
                       int64_t unit_cols) const {
  if (shard.empty()) {  // the stacked tensor itself (a per-rank checkpoint in this layout)
    check_shape(loaded, param.data.sizes(), "the stacked expert weight");
    copy_weight(param.data, loaded);
    return param.data.numel();
  }
  // Sizes in the parameter's units (1 x 1: the weight's elements; a block: see block_loader). A rank's
  // slice of I is whole units whenever it is a slice (block_loader checked), so it starts at rank * size.
  auto units = [](int64_t size, int64_t unit) { return (size + unit - 1) / unit; };
  const int64_t e = shard.expert, experts = shape_.num_experts;
  const int64_t inter = units(shape_.intermediate_size, unit_rows), hidden = units(shape_.hidden_size, unit_cols);
  const int64_t total = units(options_.intermediate_size, unit_rows), begin = ctx_.tp_rank * inter;
  // w2 [E, H, I]: H in rows, I in columns.
  const int64_t w2_hidden = units(shape_.hidden_size, unit_rows), w2_inter = units(shape_.intermediate_size, unit_cols);
  const int64_t w2_total = units(options_.intermediate_size, unit_cols), w2_begin = ctx_.tp_rank * w2_inter;
  if (e < 0 && (shard.name == "w13" || shard.name == "w2")) {
    // All experts in one tensor, as transformers 5 keeps them: gate_up_proj [E, 2I, H] (gate rows
    // first), down_proj [E, H, I].
    if (param.data.dim() != 3 || param.data.size(1) != (shard.name == "w13" ? 2 * inter : w2_hidden))
      fail(ErrorKind::Input, "stacked experts '", shard.name, "' do not belong to a parameter of shape ",
           shape_str(param.data.sizes()));
    if (shard.name == "w13") {
      check_shape(loaded, {experts, 2 * total, hidden}, "the stacked expert gate/up projections");
      copy_weight(param.data.narrow(1, 0, inter), loaded.narrow(1, begin, inter));
      copy_weight(param.data.narrow(1, inter, inter), loaded.narrow(1, total + begin, inter));
    } else {
      check_shape(loaded, {experts, w2_hidden, w2_total}, "the stacked expert down projections");
      copy_weight(param.data, loaded.narrow(2, w2_begin, w2_inter));
    }
    return param.data.numel();
  }
  if (e < 0 || e >= shape_.num_experts)
    fail(ErrorKind::Input, "expert ", e, " is out of range (", shape_.num_experts, " experts)");
  const bool w13 = shard.name == "w1" || shard.name == "w3";
  if (!w13 && shard.name != "w2") fail(ErrorKind::Input, "unknown expert shard '", shard.name, "'");
  if (param.data.dim() != 3 || param.data.size(1) != (w13 ? 2 * inter : hidden))
    fail(ErrorKind::Input, "expert shard '", shard.name, "' does not belong to a parameter of shape ",
         shape_str(param.data.sizes()));
  at::Tensor expert = param.data.select(0, e);
  if (w13) {  // gate_proj / up_proj [I, H]: this rank's rows, into the first / second half
    check_shape(loaded, {total, hidden}, cat("expert ", e, " ", shard.name == "w1" ? "gate" : "up", " projection"));
    copy_weight(expert.narrow(0, shard.name == "w1" ? 0 : inter, inter), loaded.narrow(0, begin, inter));
  } else {  // down_proj [H, I]: this rank's columns
    check_shape(loaded, {hidden, total}, cat("expert ", e, " down projection"));
    copy_weight(expert, loaded.narrow(1, begin, inter));
  }
  return inter * hidden;
}

void FusedMoE::process_weights_after_loading(const KernelTargets& targets) {
  method_->process_weights_after_loading(*this, targets);
}

at::Tensor FusedMoE::forward(const at::Tensor& x, const at::Tensor& router_logits, const at::Tensor& correction_bias) {
  auto [weights, ids] = select_experts(router_logits, options_, correction_bias);
  at::Tensor out = at::zeros_like(x);
  // Experts in ascending order, each over the tokens routed to it (transformers' loop).
  at::Tensor hit = std::get<0>(at::_unique(ids.flatten().cpu(), /*sorted=*/true));
  for (int64_t e : std::vector<int64_t>(hit.data_ptr<int64_t>(), hit.data_ptr<int64_t>() + hit.numel())) {
    at::Tensor chosen = ids == e;                      // [n, k], at most one per row
    at::Tensor tokens = chosen.any(1).nonzero().squeeze(1);
    at::Tensor weight = (weights * chosen).sum(1).index_select(0, tokens);  // float32
    auto [w13, w2] = method_->expert_weights(*this, e, x.scalar_type());
    at::Tensor h = at::linear(silu_and_mul(at::linear(x.index_select(0, tokens), w13)), w2);
    out.index_add_(0, tokens, (h * weight.unsqueeze(1)).to(x.scalar_type()));
  }
  if (ctx_.tp_size > 1) {
    if (!ctx_.tp_group) fail(ErrorKind::Other, "FusedMoE: tensor parallel size ", ctx_.tp_size, " without a process group");
    ctx_.tp_group->all_reduce(out);
  }
  return out;
}

}  // namespace loadkit
