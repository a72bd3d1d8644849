#pragma once
/// \file
/// The host's C++ API: load a model through its plugin, compute logits.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "loadkit/runtime/reload_types.h"
#include "loadkit/weights.h"

namespace loadkit {

class CausalLM;
class ProcessGroup;
class Registry;
class TensorParallelGroup;
struct ModelContext;

struct LoadOptions {
  std::string model_dir;
  std::string device = "cpu";        ///< cpu, cuda, cuda:N
  std::string dtype = "auto";        ///< auto (config's), float32, bfloat16, float16
  /// auto (the checkpoint's quantization_config, none for a 16-bit one), none, or a method a
  /// plugin provides (fp8, int8); an explicit method that differs from a pre-quantized
  /// checkpoint's is a Usage error.
  std::string quantization = "auto";
  std::string load_format = "auto";  ///< auto, safetensors, sharded, dummy
  int tp_size = 1;
  int tp_rank = 0;
  /// Collectives between the ranks (RankGroup::tp_group()); may be null for
  /// tp_size > 1 when only loading (a forward then fails).
  std::shared_ptr<TensorParallelGroup> tp_group;
  /// The runtime's process group over the same ranks (RankGroup::world()), rank for rank. With it
  /// and `fanout`, a tensor-parallel load or reload of a Hugging Face checkpoint reads each tensor
  /// from storage on one rank only and broadcasts it to the others (a collective: every rank loads
  /// and reloads together). Null: every rank reads the whole checkpoint itself.
  std::shared_ptr<ProcessGroup> rank_group;
  /// Read once and fan out over `rank_group`: the default over Gloo (the CPU); on CUDA only with
  /// LOADKIT_FANOUT=1 until it has run on several GPUs (runtime/src/engine.cpp, fanout_group).
  /// false: every rank reads everything (`--no-fanout`).
  bool fanout = true;
  /// File names of a sharded-state checkpoint (`--load-format sharded`, `reload --no-process`).
  std::string sharded_pattern = "model-rank-{rank}-part-{part}.safetensors";
};

struct LoadReport {
  std::string architecture;
  std::string plugin;  ///< file of the plugin that served it
  std::string device;
  std::string dtype;
  std::string quantization;
  uint64_t bytes = 0;       ///< checkpoint bytes this rank's model took in (read here or received from its group)
  uint64_t bytes_read = 0;  ///< of those, bytes this rank read from storage itself (about 1/N with a fan-out)
  size_t tensors = 0;    ///< checkpoint tensors read
  double seconds = 0;
  /// Peak device memory above what the finished model holds; only measured on CUDA.
  std::optional<uint64_t> peak_extra_device_bytes;
  /// Every kernel tensor kept its storage and layout: a load, from build to loaded
  /// (and through a sharded-state copy); a reload or update, from start to end.
  bool pointers_stable = true;
  int layers_processed = 0;  ///< see ReloadStats (reload_types.h): the same meaning for every operation
  int layers_delayed = 0;    ///< see ReloadStats
  /// Reloads and updates: modules that received no weight (kept as they were).
  std::vector<std::string> untouched_modules;
  /// Updates and reloads with Rollback::Journal: host bytes the journal kept.
  uint64_t journal_bytes = 0;
  /// Updates: chunks applied by an earlier chunk's plan, and those of them replayed without
  /// the loaders (see ReloadStats).
  int chunks_by_plan = 0;
  int chunks_replayed = 0;
  /// Reloads: laid out as the last recorded reload, whose writes were replayed (see ReloadStats).
  bool reload_by_plan = false;
  /// Reloads that rebuild modules: the stream opened before validation, in the order the last
  /// reload of the same layout used (see ReloadStats).
  bool reload_order_kept = false;
  /// Loads and reloads that streamed their checkpoint through the staged readers (a CUDA device):
  /// where the time went, in milliseconds, in this order — "before_stream" (open, validate, plan),
  /// for reloads "open_checkpoint" (its part that opened the files and checked their headers),
  /// "pinning" (new pinned buffers), "first_tensor", "consumer_wait" (the loaders waiting for data),
  /// "consumer_work" (loaders and processing), "consumer_work_after_reserved" (its part after
  /// quantized modules' tensors), "readers_read", "readers_window_wait", "readers_ring_wait"
  /// (summed over the reader threads), "after_stream" (finish, checks, the final synchronize).
  /// Empty otherwise (updates, the plain host path).
  std::vector<std::pair<std::string, double>> stage_ms;
  /// A reload that failed while writing (its error is `error`): the layers it had already written,
  /// which now hold the new checkpoint's weights while every other layer holds its previous ones.
  /// Empty when the model is as it was before the reload (nothing written, or rolled back).
  std::vector<std::string> written_modules;
  /// A reload that failed: its error message ("" after every success).
  std::string error;

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
  ///
  /// Data is read through the descriptors opened when the headers were validated, and each file
  /// is checked unchanged after it is read (formats/safetensors_file.h): a file truncated or
  /// rewritten meanwhile is an Input error naming it; one renamed over is not a change (the
  /// opened version is read, consistently). A failure once writing has begun (such a change, a
  /// processing error): with Rollback::Journal every layer written is put back bit-identically
  /// (host memory: this rank's kernel bytes the checkpoint covers, and a device-to-host copy of
  /// them); without, the error says the weights are now mixed and report().written_modules
  /// lists the layers already written (report().error holds the message).
  const LoadReport& reload(const std::string& source_dir = "", bool process = true,
                           Rollback rollback = Rollback::None);

  /// Streaming reload for trainers: weights arrive in chunks of (name, tensor)
  /// in checkpoint naming, on any device. Each chunk is validated whole before
  /// it is applied (on meta stand-ins: no data is read or copied); a module is
  /// processed as soon as its last weight arrives. Plain weights are copied
  /// once, straight into their kernel tensors; quantized modules are rebuilt
  /// in load format first (their one staging copy). A partial update is allowed.
  ///
  /// `borrowed` says how long the chunk's tensors stay valid: UntilFinish
  /// (default; no copy) — unchanged until finish_update(), because quantized
  /// modules keep the loader calls of their weights until the module is
  /// complete; UntilReturn — the caller may overwrite them once update()
  /// returns (a reused receive buffer): what the engine still needs from them
  /// is cloned first, and only that (the weights of modules the chunk left
  /// incomplete).
  ///
  /// With Rollback::Journal, every module's kernel tensors are copied to host
  /// memory before the update first writes into them (once a session); a
  /// failure while applying, or rollback_update(), puts them all back
  /// bit-identically in the same storage. Costs the touched kernel bytes of
  /// this rank in host memory and one device-to-host copy of them.
  void begin_update(Rollback rollback = Rollback::None);
  void update(const std::vector<NamedWeight>& chunk, Borrowed borrowed = Borrowed::UntilFinish);
  /// Validates a whole planned update (tensors may be meta: shapes and dtypes only) against
  /// the model without writing: names, shard shapes, dtypes, duplicates and, when `complete`,
  /// that every weight is there. Right after begin_update(). Input error naming the tensor.
  void validate_update(const std::vector<NamedWeight>& planned, bool complete);
  const LoadReport& finish_update();
  /// With a journal: undoes the update in progress, or the last finished one until
  /// commit_update() or the next begin_update(). Without: ends an update in progress.
  void rollback_update();
  /// Frees a finished update's journal.
  void commit_update();
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
