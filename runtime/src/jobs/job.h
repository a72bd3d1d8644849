#pragma once
/// \file
/// A YAML job (`loadkit run JOB.yaml`) as data: the model, the plugin
/// directories and the steps, checked completely before anything runs.
///
/// Torch-free on purpose: the parser is fuzzed on its own. Every error it
/// raises is a Usage error (exit 2) that starts with `file:line:column: `
/// (1-based, from yaml-cpp's marks) and names the key at fault.
///
/// \code
/// model:
///   path: ${LOADKIT_FIXTURES}/llama_fp32_gqa_sharded   # relative paths: against the job file's folder
///   dtype: float32          # auto|float32|bfloat16|float16
///   device: cpu             # cpu|cuda|cuda:N
///   quantization: auto      # auto (the checkpoint's own), none, or a method a plugin provides (fp8, int8)
///   tp_size: 1
///   load_format: auto       # auto|safetensors|sharded|dummy
/// plugin_dirs: [plugins]    # searched before LOADKIT_PLUGIN_PATH and the default
/// steps:
///   - load
///   - logits: {tokens: [1, 2, 3], out: logits.safetensors}
///   - reload: {from: other_checkpoint, process_weights_after_loading: true}
///   - verify: {logits: logits.safetensors, reference: ref.safetensors, max_abs_diff: 1.0e-4}
///   - save_sharded: {out: sharded, max_part_size: 5000000000}
///   - report: {path: report.json}
/// \endcode

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace loadkit::jobs {

/// Where a node stood in the job file (1-based).
struct Mark {
  int line = 0;
  int column = 0;
};

struct ModelSpec {
  std::string path;
  std::string dtype = "auto";
  std::string device = "cpu";
  std::string quantization = "auto";
  int tp_size = 1;
  std::string load_format = "auto";
};

enum class StepKind { Load, Logits, Reload, Verify, SaveSharded, Report };

/// The step's name as written in a job ("save_sharded").
const char* step_name(StepKind kind);

/// One step; only the fields of its kind are meaningful.
struct Step {
  StepKind kind = StepKind::Load;
  Mark mark;  ///< of the step's entry in `steps`
  // logits: the token ids, given inline or as the int64 tensor `tokens` of a safetensors file.
  std::vector<int64_t> tokens;
  std::string tokens_from;
  std::string out;  ///< logits: file written; save_sharded: directory written
  Mark out_mark;    ///< of `out` (logits, save_sharded) or `path` (report): what the step writes
  // reload
  std::string from;  ///< empty: the model's own checkpoint
  bool process_weights_after_loading = true;
  // verify: tensor `logits` of both files; at least one bound is given.
  std::string logits;
  std::string reference;
  std::optional<double> max_abs_diff;
  std::optional<double> min_cosine;  ///< per row (token position)
  bool argmax = false;               ///< also require the same argmax at every position
  // save_sharded
  std::optional<uint64_t> max_part_size;
  // report
  std::string path;
};

struct Job {
  std::string file;  ///< as given; prefixes every message
  std::string name;  ///< optional `name:`
  ModelSpec model;
  Mark model_mark;
  std::vector<std::string> plugin_dirs;
  std::vector<Step> steps;
};

/// Parses and checks a job. `file_name` names the job in messages and anchors
/// relative paths (its folder); `${NAME}` in paths expands from the
/// environment. Throws loadkit::Error (Usage) `file:line:column: message`.
/// A job whose outputs write into a checkpoint it reads is refused here
/// (jobs/output_guard.h).
Job parse_job(const std::string& text, const std::string& file_name);

/// Reads `path` (Usage error naming it if it cannot be read or is not a
/// regular file: a FIFO would wait for a writer for ever) and parses it.
Job load_job(const std::string& path);

/// `file:line:column` of a step, for messages of the steps as they run.
std::string where(const Job& job, const Mark& mark);

}  // namespace loadkit::jobs
