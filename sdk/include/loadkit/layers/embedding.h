#pragma once
/// \file
/// Vocabulary-parallel embedding and LM head (vLLM's VocabParallelEmbedding, ParallelLMHead).
///
/// The vocabulary is padded to a multiple of 64 and split evenly over the
/// ranks; padding rows are zero, and are re-zeroed by every load so that a
/// reload never exposes stale or uninitialised memory.

#include <ATen/core/Tensor.h>

#include "loadkit/model_context.h"
#include "loadkit/module.h"

namespace loadkit {

constexpr int64_t kVocabPaddingSize = 64;

class VocabParallelEmbedding : public Module {
 public:
  VocabParallelEmbedding(int64_t vocab_size, int64_t embedding_dim, const ModelContext& ctx,
                         int64_t padding_size = kVocabPaddingSize);
  /// ids [n] (int64, model device) → [n, embedding_dim]
  at::Tensor forward(const at::Tensor& ids);

  int64_t vocab_size() const { return vocab_size_; }
  int64_t padded_vocab_size() const { return padded_vocab_size_; }
  /// Rows [vocab_start, vocab_start + rows_loaded) of the vocabulary live on this rank.
  int64_t vocab_start() const { return vocab_start_; }
  int64_t rows_loaded() const { return rows_loaded_; }

 protected:
  VocabParallelEmbedding(std::string type_name, int64_t vocab_size, int64_t embedding_dim, const ModelContext& ctx,
                         int64_t padding_size);
  ModelContext ctx_;
  int64_t vocab_size_, embedding_dim_, padded_vocab_size_, rows_per_rank_, vocab_start_, rows_loaded_;
};

class ParallelLMHead : public VocabParallelEmbedding {
 public:
  ParallelLMHead(int64_t vocab_size, int64_t hidden_size, const ModelContext& ctx,
                 int64_t padding_size = kVocabPaddingSize);
  /// Shares `embedding`'s weight (tie_word_embeddings): one parameter, two owners.
  void tie_to(VocabParallelEmbedding& embedding);
  /// hidden [n, hidden] → logits [n, vocab_size] (padding dropped, gathered over ranks).
  at::Tensor compute_logits(const at::Tensor& hidden);
};

}  // namespace loadkit
