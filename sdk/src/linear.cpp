#include "loadkit/layers/linear.h"

#include <ATen/ATen.h>

#include <numeric>

#include "loadkit/error.h"
#include "loadkit/weight_writes.h"

namespace loadkit {

namespace {

class UnquantizedLinearMethod final : public LinearMethod {
 public:
  std::string name() const override { return "none"; }
  void create_weights(LinearBase& layer, const LinearShape& shape, WeightLoader loader, ShardingInfo sharding,
                      const ModelContext& ctx) override {
    layer.add_parameter("weight", at::empty({shape.output_size, shape.input_size}, ctx.options()), std::move(loader),
                        sharding);
  }
  bool transforms_weights() const override { return false; }
  void process_weights_after_loading(LinearBase&, const KernelTargets&) override {}
  at::Tensor apply(LinearBase& layer, const at::Tensor& x, const at::Tensor& bias) override {
    return at::linear(x, layer.param("weight").data, bias);
  }
};

int64_t split_size(int64_t total, int tp_size, const char* what) {
  if (total % tp_size != 0)
    fail(ErrorKind::Usage, "tensor parallel size ", tp_size, " does not divide ", what, " (", total, ")");
  return total / tp_size;
}

int64_t blocks(int64_t size, int64_t unit) { return (size + unit - 1) / unit; }

/// Fails (Usage) unless a rank's slice of `size` elements, split over ranks, falls on block boundaries.
void check_block_split(int64_t size, int64_t unit, const ModelContext& ctx, const std::string& what) {
  if (size % unit != 0)
    fail(ErrorKind::Usage, "tensor parallel size ", ctx.tp_size, " cuts a ", unit, "-element quantization block of ",
         what, " (", size, " per rank); block-quantized weights need every rank's slice to be whole blocks");
}

/// The shape a checkpoint tensor must have: `param_shape` with dim `dim` replaced by `full`.
std::vector<int64_t> full_shape(at::IntArrayRef param_shape, int64_t dim, int64_t full) {
  std::vector<int64_t> shape(param_shape.begin(), param_shape.end());
  shape[dim] = full;
  return shape;
}

}  // namespace

std::shared_ptr<LinearMethod> unquantized_linear_method() {
  static auto method = std::make_shared<UnquantizedLinearMethod>();
  return method;
}

// ---------------------------------------------------------------- LinearBase

LinearBase::LinearBase(std::string type_name, const ModelContext& ctx, LinearShape shape, const LinearOptions& options)
    : Module(std::move(type_name)), ctx_(ctx), shape_(shape), quantizable_(options.quantize) {
  // The layer's name is not known yet: the method most layers get, until assign_quant_methods asks by name.
  method_ = quantizable_ && ctx.quant ? ctx.quant->linear_method(LayerPrefix{}) : unquantized_linear_method();
}

void LinearBase::create(WeightLoader weight_loader, ShardingInfo weight_sharding, WeightLoader bias_loader,
                        ShardingInfo bias_sharding, bool bias) {
  output_row_loader_ = bias_loader;
  weight_loader_ = weight_loader;
  weight_sharding_ = weight_sharding;
  method_->create_weights(*this, shape_, std::move(weight_loader), weight_sharding, ctx_);
  if (bias) add_parameter("bias", at::empty({shape_.output_size}, ctx_.options()), std::move(bias_loader), bias_sharding);
}

void LinearBase::use_method(std::shared_ptr<LinearMethod> method) {
  if (!method || method == method_) return;
  // The bias is removed and added back after the new method's parameters, so the parameters keep
  // the order a layer built with that method has (the order of sharded-state files).
  std::shared_ptr<Parameter> bias;
  for (const auto& [name, param] : parameters())
    if (name == "bias") bias = param;
  std::vector<std::string> names;
  for (const auto& [name, param] : parameters()) names.push_back(name);
  for (const std::string& name : names) remove_parameter(name);
  method_ = std::move(method);
  method_->create_weights(*this, shape_, weight_loader_, weight_sharding_, ctx_);
  if (bias) add_parameter("bias", bias);
}

at::Tensor LinearBase::forward(const at::Tensor& x) {
  at::Tensor bias;
  if (Parameter* b = find_param("bias")) bias = b->data;
  if (!bias_after_reduce_ || ctx_.tp_size == 1) return finish(method_->apply(*this, x, bias));
  at::Tensor y = finish(method_->apply(*this, x, at::Tensor()));
  return bias.defined() ? y.add_(bias) : y;
}

void LinearBase::process_weights_after_loading(const KernelTargets& targets) {
  method_->process_weights_after_loading(*this, targets);
}

WeightLoader LinearBase::block_loader(int64_t, int64_t) { return default_weight_loader(); }

size_t LinearBase::part_of(const ShardId& shard) const {
  if (!shard.empty()) fail(ErrorKind::Input, "parameter takes no shard id, got '", shard.str(), "'");
  return 0;
}

// ------------------------------------------------------ ColumnParallelLinear

ColumnParallelLinear::Layout ColumnParallelLinear::even_layout(std::vector<int64_t> output_sizes,
                                                               const ModelContext& ctx) {
  Layout layout;
  for (int64_t total : output_sizes) {
    layout.rank_sizes.push_back(split_size(total, ctx.tp_size, "a column-parallel output size"));
    layout.shard_index.push_back(ctx.tp_rank);
  }
  layout.total_sizes = std::move(output_sizes);
  return layout;
}

ColumnParallelLinear::ColumnParallelLinear(int64_t input_size, int64_t output_size, const ModelContext& ctx,
                                           LinearOptions options)
    : ColumnParallelLinear("ColumnParallelLinear", input_size, even_layout({output_size}, ctx), ctx, options) {}

ColumnParallelLinear::ColumnParallelLinear(std::string type_name, int64_t input_size, Layout layout,
                                           const ModelContext& ctx, const LinearOptions& options)
    : LinearBase(std::move(type_name), ctx,
                 {input_size, std::accumulate(layout.rank_sizes.begin(), layout.rank_sizes.end(), int64_t{0})},
                 options),
      layout_(std::move(layout)) {
  ShardingInfo sharding{.output_dim = 0, .input_dim = 1, .tp_rank = ctx.tp_rank, .tp_size = ctx.tp_size};
  ShardingInfo bias_sharding{.output_dim = 0, .tp_rank = ctx.tp_rank, .tp_size = ctx.tp_size};
  // Dispatches to the most derived part_of() at call time (after construction).
  auto loader = describing_writes(
      [this](Parameter& p, const at::Tensor& loaded, const ShardId& shard) { return load(p, loaded, shard, 1); });
  create(loader, sharding, loader, bias_sharding, options.bias);
}

WeightLoader ColumnParallelLinear::block_loader(int64_t block_rows, int64_t) {
  // Checked when a tensor arrives, not here: the loader's error then names the parameter.
  return describing_writes([this, block_rows](Parameter& p, const at::Tensor& loaded, const ShardId& shard) {
    for (size_t i = 0; i < layout_.total_sizes.size(); ++i)
      if (layout_.rank_sizes[i] != layout_.total_sizes[i])
        check_block_split(layout_.rank_sizes[i], block_rows, ctx_, cat(type_name(), " output part ", i));
    return load(p, loaded, shard, block_rows);
  });
}

int64_t ColumnParallelLinear::load(Parameter& param, const at::Tensor& loaded, const ShardId& shard, int64_t unit) {
  const size_t part = part_of(shard);
  return part == kFused ? load_fused(param, loaded, unit) : load_part(param, loaded, part, unit);
}

int64_t ColumnParallelLinear::load_part(Parameter& param, const at::Tensor& loaded, size_t index, int64_t unit) {
  // In units: a part's rows round up to whole units, and a split part is whole units per rank
  // (block_loader checked it), so this rank's slice starts at shard_index * its size.
  const int64_t size = blocks(layout_.rank_sizes[index], unit);
  int64_t offset = 0;
  for (size_t i = 0; i < index; ++i) offset += blocks(layout_.rank_sizes[i], unit);
  check_shape(loaded, full_shape(param.data.sizes(), 0, blocks(layout_.total_sizes[index], unit)),
              "parameter (all ranks)");
  at::Tensor dst = param.data.narrow(0, offset, size);
  copy_weight(dst, loaded.narrow(0, layout_.shard_index[index] * size, size));
  return dst.numel();
}

int64_t ColumnParallelLinear::load_fused(Parameter& param, const at::Tensor& loaded, int64_t unit) {
  const auto& totals = layout_.total_sizes;
  int64_t total = 0;
  for (size_t i = 0; i < totals.size(); ++i) {
    // One tensor holds every part: its blocks run across part boundaries unless each part but the
    // last fills whole blocks, and then it cannot be cut into the parts' own blocks.
    if (unit > 1 && i + 1 < totals.size() && totals[i] % unit != 0)
      fail(ErrorKind::Input, "a fused tensor's block scales cannot be split into its parts: part ", i, " has ",
           totals[i], " rows, not a multiple of the ", unit, "-row block");
    total += blocks(totals[i], unit);
  }
  check_shape(loaded, full_shape(param.data.sizes(), 0, total), "fused parameter (all ranks)");
  int64_t written = 0, start = 0;
  for (size_t i = 0; i < totals.size(); ++i) {
    written += load_part(param, loaded.narrow(0, start, blocks(totals[i], unit)), i, unit);
    start += blocks(totals[i], unit);
  }
  return written;
}

MergedColumnParallelLinear::MergedColumnParallelLinear(int64_t input_size, std::vector<int64_t> output_sizes,
                                                       const ModelContext& ctx, LinearOptions options)
    : ColumnParallelLinear("MergedColumnParallelLinear", input_size, even_layout(std::move(output_sizes), ctx), ctx,
                           options) {}

size_t MergedColumnParallelLinear::part_of(const ShardId& shard) const {
  if (shard.empty()) return kFused;
  for (size_t i = 0; i < layout_.total_sizes.size(); ++i)
    if (shard.expert < 0 && shard.name == std::to_string(i)) return i;
  fail(ErrorKind::Input, "unknown shard id '", shard.str(), "' for a merged linear of ", layout_.total_sizes.size(),
       " parts");
}

ColumnParallelLinear::Layout QKVParallelLinear::qkv_layout(int64_t head_size, int64_t total_num_heads,
                                                           int64_t total_num_kv_heads, const ModelContext& ctx) {
  const int tp = ctx.tp_size;
  const int64_t num_heads = split_size(total_num_heads, tp, "the number of attention heads");
  int64_t num_kv_heads = 0, replicas = 1;
  if (tp >= total_num_kv_heads) {
    // Fewer kv heads than ranks: each rank holds one kv head, shared by tp / kv_heads ranks.
    if (tp % total_num_kv_heads != 0)
      fail(ErrorKind::Usage, "tensor parallel size ", tp, " is not a multiple of the ", total_num_kv_heads,
           " kv heads");
    num_kv_heads = 1;
    replicas = tp / total_num_kv_heads;
  } else {
    num_kv_heads = split_size(total_num_kv_heads, tp, "the number of kv heads");
  }
  const int64_t kv_index = ctx.tp_rank / replicas;
  return Layout{
      .total_sizes = {total_num_heads * head_size, total_num_kv_heads * head_size, total_num_kv_heads * head_size},
      .rank_sizes = {num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size},
      .shard_index = {ctx.tp_rank, kv_index, kv_index},
  };
}

QKVParallelLinear::QKVParallelLinear(int64_t hidden_size, int64_t head_size, int64_t total_num_heads,
                                     int64_t total_num_kv_heads, const ModelContext& ctx, LinearOptions options)
    : ColumnParallelLinear("QKVParallelLinear", hidden_size,
                           qkv_layout(head_size, total_num_heads, total_num_kv_heads, ctx), ctx, options),
      head_size_(head_size) {}

size_t QKVParallelLinear::part_of(const ShardId& shard) const {
  if (shard.empty()) return kFused;
  static const char* names[] = {"q", "k", "v"};
  for (size_t i = 0; i < 3; ++i)
    if (shard.expert < 0 && shard.name == names[i]) return i;
  fail(ErrorKind::Input, "unknown shard id '", shard.str(), "' for a qkv linear (want q, k or v)");
}

// --------------------------------------------------------- RowParallelLinear

RowParallelLinear::RowParallelLinear(int64_t input_size, int64_t output_size, const ModelContext& ctx,
                                     LinearOptions options)
    : LinearBase("RowParallelLinear", ctx,
                 {split_size(input_size, ctx.tp_size, "a row-parallel input size"), output_size}, options) {
  bias_after_reduce_ = true;
  full_input_ = input_size;
  auto weight_loader = describing_writes([this](Parameter& p, const at::Tensor& loaded, const ShardId& shard) {
    return load(p, loaded, shard, 1);
  });
  ShardingInfo sharding{.output_dim = 0, .input_dim = 1, .tp_rank = ctx.tp_rank, .tp_size = ctx.tp_size};
  create(weight_loader, sharding, default_weight_loader(), {}, options.bias);
}

int64_t RowParallelLinear::load(Parameter& p, const at::Tensor& loaded, const ShardId& shard, int64_t unit_cols) const {
  if (!shard.empty()) fail(ErrorKind::Input, "parameter takes no shard id, got '", shard.str(), "'");
  check_shape(loaded, full_shape(p.data.sizes(), 1, blocks(full_input_, unit_cols)), "parameter (all ranks)");
  const int64_t size = blocks(shape_.input_size, unit_cols);
  copy_weight(p.data, loaded.narrow(1, ctx_.tp_rank * size, size));
  return p.data.numel();
}

WeightLoader RowParallelLinear::block_loader(int64_t, int64_t block_cols) {
  return describing_writes([this, block_cols](Parameter& p, const at::Tensor& loaded, const ShardId& shard) {
    if (ctx_.tp_size > 1) check_block_split(shape_.input_size, block_cols, ctx_, "RowParallelLinear's input");
    return load(p, loaded, shard, block_cols);
  });
}

at::Tensor RowParallelLinear::finish(at::Tensor y) {
  if (ctx_.tp_size > 1) {
    if (!ctx_.tp_group) fail(ErrorKind::Other, "RowParallelLinear: tensor parallel size ", ctx_.tp_size, " without a process group");
    ctx_.tp_group->all_reduce(y);
  }
  return y;
}

ReplicatedLinear::ReplicatedLinear(int64_t input_size, int64_t output_size, const ModelContext& ctx,
                                   LinearOptions options)
    : LinearBase("ReplicatedLinear", ctx, {input_size, output_size}, options) {
  create(default_weight_loader(), {}, default_weight_loader(), {}, options.bias);
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  const int64_t d = x.size(-1) / 2;
  return at::silu(x.narrow(-1, 0, d)) * x.narrow(-1, d, d);
}

at::Tensor gelu_tanh_and_mul(const at::Tensor& x) {
  const int64_t d = x.size(-1) / 2;
  return at::gelu(x.narrow(-1, 0, d), "tanh") * x.narrow(-1, d, d);
}

}  // namespace loadkit
