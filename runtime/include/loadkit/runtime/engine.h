#pragma once
/// \file
/// The host's C++ API: load a model through its plugin, compute logits.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "loadkit/weights.h"

namespace loadkit {

class CausalLM;
class Registry;
class TensorParallelGroup;
struct ModelContext;

struct LoadOptions {
  std::string model_dir;
  std::string device = "cpu";        ///< cpu, cuda, cuda:N
  std::string dtype = "auto";        ///< auto (config's), float32, bfloat16, float16
  std::string quantization = "none";
  std::string load_format = "auto";  ///< auto, safetensors, sharded, dummy
  int tp_size = 1;
  int tp_rank = 0;
  /// Collectives between the ranks (RankGroup::tp_group()); may be null for
  /// tp_size > 1 when only loading (a forward then fails).
  std::shared_ptr<TensorParallelGroup> tp_group;
  /// File names of a sharded-state checkpoint (`--load-format sharded`, `reload --no-process`).
  std::string sharded_pattern = "model-rank-{rank}-part-{part}.safetensors";
};

struct LoadReport {
  std::string architecture;
  std::string plugin;  ///< file of the plugin that served it
  std::string device;
  std::string dtype;
  std::string quantization;
  uint64_t bytes = 0;    ///< checkpoint bytes read
  size_t tensors = 0;    ///< checkpoint tensors read
  double seconds = 0;
  /// Peak device memory above what the finished model holds; only measured on CUDA.
  std::optional<uint64_t> peak_extra_device_bytes;
  bool pointers_stable = true;  ///< every parameter kept its data_ptr from build to ready
  int layers_processed = 0;
  int layers_delayed = 0;
  /// Reloads and updates: modules that received no weight (kept as they were).
  std::vector<std::string> untouched_modules;

  double gb_per_s() const { return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0.0; }
  std::string to_json() const;
};

class LoadedModel {
 public:
  /// Builds and loads the model described by `options`. Throws loadkit::Error.
  static std::unique_ptr<LoadedModel> load(const LoadOptions& options, const Registry& registry);
  ~LoadedModel();

  /// Reloads every weight in place from a checkpoint directory (empty: the
  /// model's own). The whole checkpoint is validated against the model first
  /// — names, shapes, dtypes, completeness — and nothing is touched if that
  /// fails. With `process` false the checkpoint is already in kernel format
  /// (the model's parameter names and shapes) and is copied straight in; a
  /// directory holding this rank's sharded-state files is read through those.
  const LoadReport& reload(const std::string& source_dir = "", bool process = true);

  /// Streaming reload for trainers: weights arrive in chunks of (name, tensor)
  /// in checkpoint naming. Each chunk is validated whole before it is applied;
  /// a module is processed as soon as its last weight arrives. Tensors must
  /// stay unchanged until finish_update(). A partial update is allowed.
  void begin_update();
  void update(const std::vector<NamedWeight>& chunk);
  const LoadReport& finish_update();
  /// Between begin_update() and finish_update() (a chunk that failed while
  /// being applied, past validation, ends the session).
  bool updating() const;

  /// Logits of one sequence (positions 0..n-1): float32 [n, vocab_size] on the CPU.
  /// Every token must be inside the vocabulary (Usage error otherwise).
  at::Tensor logits(const std::vector<int64_t>& tokens);

  CausalLM& model();
  const ModelContext& context() const;
  const LoadReport& report() const { return report_; }

 private:
  LoadedModel();
  struct State;
  std::unique_ptr<State> state_;
  LoadReport report_;
};

/// Parses "1,2,3" into token ids (Usage error naming the bad item).
std::vector<int64_t> parse_tokens(const std::string& text);

}  // namespace loadkit
