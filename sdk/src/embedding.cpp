#include "loadkit/layers/embedding.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "loadkit/error.h"
#include "loadkit/weight_writes.h"

namespace loadkit {

VocabParallelEmbedding::VocabParallelEmbedding(int64_t vocab_size, int64_t embedding_dim, const ModelContext& ctx,
                                               int64_t padding_size)
    : VocabParallelEmbedding("VocabParallelEmbedding", vocab_size, embedding_dim, ctx, padding_size) {}

VocabParallelEmbedding::VocabParallelEmbedding(std::string type_name, int64_t vocab_size, int64_t embedding_dim,
                                               const ModelContext& ctx, int64_t padding_size)
    : Module(std::move(type_name)), ctx_(ctx), vocab_size_(vocab_size), embedding_dim_(embedding_dim) {
  if (vocab_size <= 0 || embedding_dim <= 0)
    fail(ErrorKind::Input, ctx.config.origin(), ": vocabulary ", vocab_size, " x ", embedding_dim, " is empty");
  padded_vocab_size_ = (vocab_size + padding_size - 1) / padding_size * padding_size;
  if (padded_vocab_size_ % ctx.tp_size != 0)
    fail(ErrorKind::Usage, "tensor parallel size ", ctx.tp_size, " does not divide the padded vocabulary ",
         padded_vocab_size_);
  rows_per_rank_ = padded_vocab_size_ / ctx.tp_size;
  vocab_start_ = ctx.tp_rank * rows_per_rank_;
  rows_loaded_ = std::clamp<int64_t>(vocab_size_ - vocab_start_, 0, rows_per_rank_);

  auto loader = describing_writes([this](Parameter& p, const at::Tensor& loaded, const ShardId& shard) -> int64_t {
    if (!shard.empty()) fail(ErrorKind::Input, "parameter takes no shard id, got '", shard.str(), "'");
    check_shape(loaded, {vocab_size_, embedding_dim_}, "vocabulary (unpadded, all ranks)");
    copy_weight(p.data.narrow(0, 0, rows_loaded_), loaded.narrow(0, vocab_start_, rows_loaded_));
    if (rows_loaded_ < rows_per_rank_) zero_weight(p.data.narrow(0, rows_loaded_, rows_per_rank_ - rows_loaded_));
    return rows_loaded_ * embedding_dim_;
  });
  ShardingInfo sharding{.output_dim = 0, .vocab_rows = true, .tp_rank = ctx.tp_rank, .tp_size = ctx.tp_size};
  Parameter& weight = add_parameter("weight", at::zeros({rows_per_rank_, embedding_dim_}, ctx.options()), loader, sharding);
  weight.expected_load_numel = rows_loaded_ * embedding_dim_;
}

at::Tensor VocabParallelEmbedding::forward(const at::Tensor& ids) {
  const at::Tensor& weight = param("weight").data;
  if (ctx_.tp_size == 1) return at::embedding(weight, ids);
  at::Tensor in_range = (ids >= vocab_start_).logical_and_(ids < vocab_start_ + rows_loaded_);
  at::Tensor out = at::embedding(weight, (ids - vocab_start_).mul_(in_range));
  out.masked_fill_(in_range.logical_not().unsqueeze(-1), 0);
  if (!ctx_.tp_group) fail(ErrorKind::Other, type_name(), ": tensor parallel size ", ctx_.tp_size, " without a process group");
  ctx_.tp_group->all_reduce(out);
  return out;
}

ParallelLMHead::ParallelLMHead(int64_t vocab_size, int64_t hidden_size, const ModelContext& ctx, int64_t padding_size)
    : VocabParallelEmbedding("ParallelLMHead", vocab_size, hidden_size, ctx, padding_size) {}

void ParallelLMHead::tie_to(VocabParallelEmbedding& embedding) {
  remove_parameter("weight");
  add_parameter("weight", embedding.shared_param("weight"));
}

at::Tensor ParallelLMHead::compute_logits(const at::Tensor& hidden) {
  at::Tensor logits = at::linear(hidden, param("weight").data);
  if (ctx_.tp_size > 1) {
    if (!ctx_.tp_group) fail(ErrorKind::Other, type_name(), ": tensor parallel size ", ctx_.tp_size, " without a process group");
    logits = ctx_.tp_group->all_gather(logits, -1);
  }
  return logits.narrow(-1, 0, vocab_size_);
}

}  // namespace loadkit
