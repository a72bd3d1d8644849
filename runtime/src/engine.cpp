#include "loadkit/runtime/engine.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string_view>

#include "device.h"
#include "fanout/fanout_stream.h"
#include "formats/checkpoint_files.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/model_context.h"
#include "loadkit/quant_method.h"
#include "loadkit/runtime/distributed.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"
#include "reload/kernel_copy.h"
#include "reload/reload_engine.h"
#include "reload/storage_snapshot.h"
#include "sharded_state.h"
#include "staging/staged_stream.h"  // default_window_bytes
#include "weight_sources.h"

namespace loadkit {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct LoadedModel::State {
  ModelContext ctx;
  std::string model_dir;
  std::string sharded_pattern;
  std::shared_ptr<ProcessGroup> fanout_group;  // set: loads and reloads read once for the group
  std::shared_ptr<CausalLM> model;
  std::unique_ptr<ReloadEngine> reload;  // metadata recorded at build time; refers to ctx
  Clock::time_point update_start;
  uint64_t update_bytes = 0;
  uint64_t allocated_at_start = 0;

  /// The model's load_weights, as the reload engine streams through it.
  ReloadEngine::Loader loader() {
    return [this](WeightStream& w) { model->load_weights(w); };
  }
};

LoadedModel::LoadedModel() : state_(std::make_unique<State>()) {}
LoadedModel::~LoadedModel() = default;
CausalLM& LoadedModel::model() { return *state_->model; }
const ModelContext& LoadedModel::context() const { return state_->ctx; }

// ------------------------------------------------------------ load, stage by stage

namespace {

c10::ScalarType parse_dtype(const std::string& text, const ModelConfig& config) {
  std::string name = text;
  if (name == "auto") {
    // transformers 5 writes "dtype", earlier versions "torch_dtype".
    name = config.get_string("dtype", config.get_string("torch_dtype", "float32"));
    if (name == "float") name = "float32";
  }
  if (name == "float32") return c10::ScalarType::Float;
  if (name == "bfloat16") return c10::ScalarType::BFloat16;
  if (name == "float16" || name == "half") return c10::ScalarType::Half;
  if (text == "auto") fail(ErrorKind::Input, config.origin(), ": dtype '", name, "' is not float32, bfloat16 or float16");
  fail(ErrorKind::Usage, "--dtype: '", text, "' is not auto, float32, bfloat16 or float16");
}

const char* dtype_label(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    default: return "other";
  }
}

/// The load's clock, and per-stage times at debug level (where a fresh process's load goes).
class StageClock {
 public:
  /// Starts once the device is up: the process's one-time CUDA context start-up (~0.3 s) is not
  /// loading, as for the baselines, which run in a process whose CUDA is already initialised.
  explicit StageClock(const c10::Device& device) : device_(device), profile_(log::enabled(log::Level::debug)) {
    device::synchronize(device_);
    start_ = lap_start_ = Clock::now();
  }
  void lap(const char* stage) {
    if (!profile_) return;
    device::synchronize(device_);
    const auto now = Clock::now();
    log::debug(cat("load stage ", stage, ": ", std::chrono::duration<double, std::milli>(now - lap_start_).count(), " ms"));
    lap_start_ = now;
  }
  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  Clock::time_point started() const { return start_; }

 private:
  c10::Device device_;
  bool profile_;
  Clock::time_point start_, lap_start_;
};

/// The report's stage times (engine.h, LoadReport::stage_ms) of the staged stream an operation
/// that started at `start` and ends now ran; empty when it ran none.
std::vector<std::pair<std::string, double>> stream_stages(Clock::time_point start) {
  const auto p = last_staging_profile();
  if (!p || p->opened_at < start) return {};
  auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  return {{"before_stream", ms(start, p->opened_at)},
          {"pinning", p->pinning_ms},
          {"first_tensor", p->first_tensor_ms},
          {"consumer_wait", p->consumer_wait_ms},
          {"consumer_work", p->consumer_work_ms},
          {"consumer_work_after_reserved", p->consumer_work_after_reserved_ms},
          {"readers_read", p->read_ms},
          {"readers_window_wait", p->window_wait_ms},
          {"readers_ring_wait", p->ring_wait_ms},
          {"after_stream", ms(p->closed_at, Clock::now())}};
}

/// Stage 1: the model's config, dtype, device and rank; the report's labels.
void read_context(const LoadOptions& options, ModelContext& ctx, LoadReport& report) {
  if (options.tp_size < 1 || options.tp_rank < 0 || options.tp_rank >= options.tp_size)
    fail(ErrorKind::Usage, "tensor parallel rank ", options.tp_rank, " of ", options.tp_size, " is not a rank");
  std::error_code ec;
  if (!fs::is_directory(options.model_dir, ec)) {
    if (ec && ec != std::errc::no_such_file_or_directory)
      fail(ErrorKind::Input, options.model_dir, ": cannot access model directory: ", ec.message());
    fail(ErrorKind::Input, options.model_dir, ": model directory does not exist");
  }
  ctx.config = ModelConfig::from_file((fs::path(options.model_dir) / "config.json").string());
  const auto architectures = ctx.config.get_strings("architectures");
  if (architectures.empty()) fail(ErrorKind::Input, ctx.config.origin(), ": 'architectures' is empty");
  report.architecture = architectures.front();
  ctx.dtype = parse_dtype(options.dtype, ctx.config);
  ctx.device = device::parse(options.device);
  ctx.tp_rank = options.tp_rank;
  ctx.tp_size = options.tp_size;
  ctx.tp_group = options.tp_group;
  report.device = ctx.device.str();
  report.dtype = dtype_label(ctx.dtype);
  report.quantization = options.quantization;
}

/// Stage 3: the quantization method. `auto` is the checkpoint's own: config.json's
/// quantization_config.quant_method, or none for a 16-bit checkpoint. An explicit method must
/// agree with a pre-quantized checkpoint (its weights are in that method's format): Usage error.
std::string quantization_method(const std::string& asked, const ModelConfig& config) {
  std::string declared;
  if (config.has("quantization_config")) declared = config.get_object("quantization_config").get_string("quant_method");
  if (asked == "auto") return declared.empty() ? "none" : declared;
  if (!declared.empty() && asked != declared)
    fail(ErrorKind::Usage, "quantization '", asked, "' was asked for, but ", config.origin(),
         " is already quantized (quantization_config.quant_method '", declared, "'): load it with quantization auto or ",
         declared);
  return asked;
}

/// Whether a reload source declares a quantization (its config.json has quantization_config):
/// its weights must then be quantized already; otherwise 16-bit weights are quantized as they arrive.
bool declares_quantization(const std::string& dir) {
  const fs::path config = fs::path(dir) / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return false;
  return ModelConfig::from_file(config.string()).has("quantization_config");
}

/// Where a load's weights come from.
struct LoadSource {
  bool sharded = false;  ///< this rank's kernel-format state (copied over the processed model)
  std::optional<safetensors::CheckpointFiles> files;  ///< none: dummy weights
};

/// Stage 2: every header validated before anything is built.
LoadSource open_source(const LoadOptions& options) {
  const std::string& format = options.load_format;
  if (format != "auto" && format != "safetensors" && format != "sharded" && format != "dummy")
    fail(ErrorKind::Usage, "--load-format: '", format, "' is not auto, safetensors, sharded or dummy");
  LoadSource source;
  if (format == "sharded") {
    source.sharded = true;
    source.files = open_sharded_state(options.model_dir, options.tp_rank, options.sharded_pattern);
    // vLLM would narrow every tensor into a rank's larger parameter and carry on.
    if (has_sharded_state(options.model_dir, options.tp_size, options.sharded_pattern))
      fail(ErrorKind::Input, options.model_dir, ": holds sharded state for rank ", options.tp_size,
           ", so it was saved with a tensor parallel size above ", options.tp_size, " (--tp-size)");
  } else if (format != "dummy") {
    source.files = safetensors::open_checkpoint(options.model_dir);
    if (!source.files->ignored_files.empty()) log::info(safetensors::ignored_files_note(*source.files));
  }
  return source;
}

/// Fails (out of memory, Other) before anything is built when the checkpoint's
/// weights, in the dtype they will have on the device, exceed its free memory.
void check_fits(const safetensors::CheckpointFiles& files, const ModelContext& ctx) {
  uint64_t needed = 0;
  for (const auto& file : files.files)
    for (const auto& t : file->tensors()) {
      const bool floating = t.dtype == safetensors::DType::F16 || t.dtype == safetensors::DType::BF16 ||
                            t.dtype == safetensors::DType::F32 || t.dtype == safetensors::DType::F64;
      needed += floating ? t.numel * c10::elementSize(ctx.dtype) : t.bytes();
    }
  const uint64_t free = device::free_bytes(ctx.device);
  if (needed > free)
    fail(ErrorKind::Other, files.directory, ": out of memory: its weights need ", needed >> 20, " MiB as ",
         dtype_label(ctx.dtype), " on ", ctx.device.str(), " but only ", free >> 20, " MiB are free");
}

/// The group a tensor-parallel load reads its checkpoint once for (fanout/fanout_stream.h), or
/// null: one rank, no runtime group, or `fanout` off. (Sharded state is each rank's own and is
/// never fanned out; its reloads from a Hugging Face checkpoint are.)
std::shared_ptr<ProcessGroup> fanout_group(const LoadOptions& options) {
  if (options.tp_size == 1 || !options.rank_group || !options.fanout) return nullptr;
  // Over NCCL the fan-out has not yet run on a machine with several GPUs: on CUDA it is opt-in
  // (LOADKIT_FANOUT=1) until it has, and every rank reads the whole checkpoint as before. Over
  // Gloo (the CPU), where its tests run, it is the default.
  const char* opt_in = std::getenv("LOADKIT_FANOUT");
  if (options.device.starts_with("cuda") && !(opt_in && std::string_view(opt_in) == "1")) return nullptr;
  if (options.rank_group->size() != options.tp_size || options.rank_group->rank() != options.tp_rank)
    fail(ErrorKind::Usage, "the rank group (rank ", options.rank_group->rank(), " of ", options.rank_group->size(),
         ") is not the tensor-parallel group (rank ", options.tp_rank, " of ", options.tp_size, ")");
  return options.rank_group;
}

/// Stage 4: the checkpoint's stream, started before the model is built: its readers pin their
/// buffers (a fresh process's main set-up cost, see staging/pinned_pool.h) and read ahead while
/// the model is built. A window of at least the largest tensor: every tensor is staged. With a
/// group, the read-once stream instead (its rounds as large as that window).
std::unique_ptr<WeightStream> start_stream(const LoadSource& source, const c10::Device& device, ProcessGroup* group,
                                           FanoutStats& fanout) {
  if (source.sharded || !source.files) return nullptr;
  StreamPlan plan;
  plan.window_bytes = std::max(safetensors::largest_tensor_bytes(*source.files), default_window_bytes());
  if (group) return fanout_stream(*source.files, *group, plan, &fanout);
  return open_weight_stream(*source.files, device, plan);
}

/// Stage 6: the weights into the built parameters — the checkpoint through the model's own
/// loaders, or small random values (dummy, and sharded state, which is copied over the processed
/// model). Returns whether every parameter kept its storage.
bool fill_weights(CausalLM& model, std::unique_ptr<WeightStream> stream, StageClock& clock) {
  const reload::StorageSnapshot built(model);
  if (stream) {
    reset_load_counts(model);
    model.load_weights(*stream);
    check_all_initialized(model);
    clock.lap("read and copy the weights");
    stream.reset();
    clock.lap("stop the stream");
  } else {
    initialize_dummy_weights(model);
  }
  return built.unchanged(model);
}

/// Stage 7: every module processed, attention-like modules last (they may read what others produced).
void process_all(Module& root) {
  std::vector<Module*> attention;
  for (auto& [name, module] : root.named_modules()) {
    if (module->is_attention_like()) {
      attention.push_back(module);
      continue;
    }
    module->process_weights_after_loading();
  }
  for (Module* m : attention) m->process_weights_after_loading();
}

}  // namespace

std::unique_ptr<LoadedModel> LoadedModel::load(const LoadOptions& options, const Registry& registry) {
  c10::AutoGradMode no_grad(false);
  std::unique_ptr<LoadedModel> loaded(new LoadedModel());
  State& s = *loaded->state_;
  LoadReport& report = loaded->report_;

  read_context(options, s.ctx, report);        // 1. config, dtype, device, rank
  StageClock clock(s.ctx.device);
  LoadSource source = open_source(options);     // 2. every header validated
  // 3. The plugin, the quantization and room on the device, before any tensor exists: a failure
  //    leaves nothing partial behind.
  report.plugin = registry.provider(report.architecture).path;
  report.quantization = quantization_method(options.quantization, s.ctx.config);
  if (report.quantization != "none") s.ctx.quant = registry.create_quant(report.quantization, s.ctx);
  if (source.files) check_fits(*source.files, s.ctx);
  clock.lap("open and validate");
  s.fanout_group = fanout_group(options);
  FanoutStats fanout;
  auto stream = start_stream(source, s.ctx.device, s.fanout_group.get(), fanout);  // 4. readers start while the model is built
  clock.lap("start the stream");

  // 5. Build, and record the load format before anything is loaded or processed.
  device::reset_peak(s.ctx.device);
  s.model = registry.create_model(report.architecture, s.ctx);
  clock.lap("build the model");
  s.reload = std::make_unique<ReloadEngine>(*s.model, s.ctx);
  s.model_dir = options.model_dir;
  s.sharded_pattern = options.sharded_pattern;

  report.pointers_stable = fill_weights(*s.model, std::move(stream), clock);  // 6. the weights
  process_all(*s.model);                                                     // 7. kernel format
  s.reload->release_load_format();
  report.layers_processed = s.reload->layers();
  clock.lap("process");
  // 8. Sharded state is kernel format: copied over the processed model, through the staged path on
  //    CUDA (open_weight_stream) with a load's read-ahead window.
  if (source.sharded) {
    const uint64_t window = std::max(safetensors::largest_tensor_bytes(*source.files), default_window_bytes());
    const ReloadStats copied = reload::copy_kernel_format(*s.model, sharded_state_targets(*s.model), *source.files,
                                                          s.ctx.device, /*complete=*/true, Rollback::None, nullptr, window);
    report.pointers_stable = report.pointers_stable && copied.pointers_stable;
  }
  if (source.files) {
    report.bytes = source.files->total_bytes;
    report.tensors = source.files->total_tensors;
    report.bytes_read = s.fanout_group && !source.sharded ? fanout.bytes_read : source.files->total_bytes;
  }
  device::synchronize(s.ctx.device);
  report.seconds = clock.seconds();
  report.stage_ms = stream_stages(clock.started());
  if (s.ctx.device.is_cuda())
    report.peak_extra_device_bytes = device::peak_allocated_bytes(s.ctx.device) - device::allocated_bytes(s.ctx.device);
  log::info(cat("loaded ", report.architecture, " (", report.tensors, " tensors, ", report.bytes >> 20, " MiB) on ",
                report.device, " in ", report.seconds, " s"));
  return loaded;
}

// ------------------------------------------------------------ reload and update

namespace {
/// Starts timing and device-memory accounting for a reload.
void start_measuring(const c10::Device& device, uint64_t& allocated_at_start) {
  device::synchronize(device);
  device::reset_peak(device);
  allocated_at_start = device::allocated_bytes(device);
}

void finish_measuring(LoadReport& report, const c10::Device& device, uint64_t allocated_at_start,
                      Clock::time_point start, const ReloadStats& stats) {
  device::synchronize(device);
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  report.peak_extra_device_bytes.reset();
  if (device.is_cuda()) {
    const uint64_t peak = device::peak_allocated_bytes(device);
    log::debug(cat("device memory: ", allocated_at_start, " bytes allocated at the start, peak ", peak, ", now ",
                   device::allocated_bytes(device)));
    report.peak_extra_device_bytes = peak > allocated_at_start ? peak - allocated_at_start : 0;
  }
  report.pointers_stable = stats.pointers_stable;
  report.layers_processed = stats.layers_processed;
  report.layers_delayed = stats.layers_delayed;
  report.untouched_modules = stats.untouched_modules;
  report.journal_bytes = stats.journal_bytes;
  report.stage_ms.clear();
  report.chunks_by_plan = stats.chunks_by_plan;
  report.chunks_replayed = stats.chunks_replayed;
  report.reload_by_plan = stats.reload_by_plan;
  report.reload_order_kept = stats.reload_order_kept;
  report.written_modules.clear();
  report.error.clear();
}
}  // namespace

namespace {
/// A reload's error once it has written part of the model: the weights are mixed, and which.
[[noreturn]] void fail_mixed(ErrorKind kind, const std::string& what, const std::string& dir,
                             const std::vector<std::string>& written) {
  constexpr size_t kNamed = 3;
  std::string names;
  for (size_t i = 0; i < written.size() && i < kNamed; ++i) names += (i ? ", " : "") + written[i];
  if (written.size() > kNamed) names += ", …";
  fail(kind, what, "; the weights are now mixed: ", written.size(), " modules (", names, ") were already written from ",
       dir, " and the others keep their previous weights (the report's written_modules lists them; reload with a "
       "journal to have a failed reload put everything back)");
}
}  // namespace

const LoadReport& LoadedModel::reload(const std::string& source_dir, bool process, Rollback rollback) {
  c10::AutoGradMode no_grad(false);
  State& s = *state_;
  const auto start = Clock::now();
  const std::string dir = source_dir.empty() ? s.model_dir : source_dir;
  if (s.reload->updating()) fail(ErrorKind::Usage, "reload during an unfinished update");
  const bool sharded = !process && has_sharded_state(dir, s.ctx.tp_rank, s.sharded_pattern);
  // Every header validated first.
  const auto files = sharded ? open_sharded_state(dir, s.ctx.tp_rank, s.sharded_pattern) : safetensors::open_checkpoint(dir);
  const auto opened = Clock::now();
  if (!files.ignored_files.empty()) log::info(safetensors::ignored_files_note(files));
  start_measuring(s.ctx.device, s.allocated_at_start);
  ReloadStats stats;
  if (s.ctx.quant) s.ctx.quant->set_quantize_on_arrival(!declares_quantization(dir));
  std::vector<std::string> written;
  report_.written_modules.clear();
  report_.error.clear();
  FanoutStats fanout;
  const bool read_once = s.fanout_group && !sharded && process;
  ReloadEngine::DataSource data;
  if (read_once) data = [&](const StreamPlan& plan) { return fanout_stream(files, *s.fanout_group, plan, &fanout); };
  try {
    if (process) {
      stats = s.reload->reload(files, s.loader(), rollback, &written, data);
    } else {
      // Kernel format: sharded state by its state-dict names, anything else by parameter names.
      const auto targets = sharded ? sharded_state_targets(*s.model) : reload::parameter_targets(*s.model);
      stats = reload::copy_kernel_format(*s.model, targets, files, s.ctx.device, /*complete=*/true, rollback, &written);
    }
  } catch (const std::exception& e) {
    const Error* ours = dynamic_cast<const Error*>(&e);
    report_.written_modules = written;
    report_.error = e.what();
    if (written.empty()) throw;  // the model is as it was
    try {
      fail_mixed(ours ? ours->kind() : ErrorKind::Other, e.what(), dir, written);
    } catch (const Error& mixed) {
      report_.error = mixed.what();
      throw;
    }
  }
  report_.bytes = files.total_bytes;
  report_.bytes_read = read_once ? fanout.bytes_read : files.total_bytes;
  report_.tensors = files.total_tensors;
  finish_measuring(report_, s.ctx.device, s.allocated_at_start, start, stats);
  report_.stage_ms = stream_stages(start);
  if (!report_.stage_ms.empty())  // the part of "before_stream" that opened and validated the files' headers
    report_.stage_ms.insert(report_.stage_ms.begin() + 1,
                            {"open_checkpoint", std::chrono::duration<double, std::milli>(opened - start).count()});
  log::info(cat("reloaded ", report_.tensors, " tensors from ", dir, " in ", report_.seconds, " s"));
  return report_;
}

void LoadedModel::begin_update(Rollback rollback) {
  State& s = *state_;
  s.reload->begin_update(rollback);
  if (s.ctx.quant) s.ctx.quant->set_quantize_on_arrival(true);  // a trainer's weights, whatever their dtype
  s.update_start = Clock::now();
  s.update_bytes = 0;
  report_.tensors = 0;
  start_measuring(s.ctx.device, s.allocated_at_start);
}

void LoadedModel::update(const std::vector<NamedWeight>& chunk, Borrowed borrowed) {
  c10::AutoGradMode no_grad(false);
  State& s = *state_;
  s.reload->update(chunk, s.loader(), borrowed);
  for (const auto& w : chunk) s.update_bytes += w.tensor.nbytes();
  report_.tensors += chunk.size();
}

void LoadedModel::validate_update(const std::vector<NamedWeight>& planned, bool complete) {
  c10::AutoGradMode no_grad(false);
  State& s = *state_;
  if (s.ctx.quant) s.ctx.quant->set_quantize_on_arrival(true);
  s.reload->validate_update(planned, s.loader(), complete);
}

const LoadReport& LoadedModel::finish_update() {
  c10::AutoGradMode no_grad(false);
  State& s = *state_;
  ReloadStats stats = s.reload->finish_update();
  report_.bytes = s.update_bytes;
  report_.bytes_read = 0;  // a trainer's tensors, not storage
  finish_measuring(report_, s.ctx.device, s.allocated_at_start, s.update_start, stats);
  return report_;
}

void LoadedModel::rollback_update() {
  c10::AutoGradMode no_grad(false);
  state_->reload->rollback();
  device::synchronize(state_->ctx.device);
}

void LoadedModel::commit_update() { state_->reload->commit(); }

bool LoadedModel::updating() const { return state_->reload->updating(); }

// ------------------------------------------------------------ forward and report

at::Tensor LoadedModel::logits(const std::vector<int64_t>& tokens) {
  c10::AutoGradMode no_grad(false);
  CausalLM& model = *state_->model;
  if (tokens.empty()) fail(ErrorKind::Usage, "--tokens: at least one token is needed");
  const int64_t vocab = model.vocab_size();
  for (int64_t t : tokens)
    if (t < 0 || t >= vocab) fail(ErrorKind::Usage, "--tokens: token ", t, " is outside the vocabulary [0, ", vocab, ")");
  at::Tensor ids = at::tensor(tokens, at::kLong).to(state_->ctx.device);
  // An Error the plugin throws here may outlive the plugin: its type lives in libloadkit_sdk (error.h).
  at::Tensor out = model.forward(ids);
  return out.narrow(-1, 0, vocab).to(at::kCPU, at::kFloat).contiguous();
}

std::string LoadReport::to_json() const {
  nlohmann::ordered_json j;
  j["architecture"] = architecture;
  j["plugin"] = plugin;
  j["device"] = device;
  j["dtype"] = dtype;
  j["quantization"] = quantization;
  j["tensors"] = tensors;
  j["bytes"] = bytes;
  j["bytes_read"] = bytes_read;
  j["seconds"] = seconds;
  j["gb_per_s"] = gb_per_s();
  j["peak_extra_device_bytes"] = peak_extra_device_bytes ? nlohmann::ordered_json(*peak_extra_device_bytes) : nullptr;
  j["pointers_stable"] = pointers_stable;
  j["layers_processed"] = layers_processed;
  j["layers_delayed"] = layers_delayed;
  j["untouched_modules"] = untouched_modules;
  j["journal_bytes"] = journal_bytes;
  j["chunks_by_plan"] = chunks_by_plan;
  j["chunks_replayed"] = chunks_replayed;
  j["reload_by_plan"] = reload_by_plan;
  j["reload_order_kept"] = reload_order_kept;
  nlohmann::ordered_json stages = nlohmann::ordered_json::object();
  for (const auto& [stage, ms] : stage_ms) stages[stage] = ms;
  j["stage_ms"] = stages;
  j["written_modules"] = written_modules;
  if (!error.empty()) j["error"] = error;
  // Paths and messages are bytes (a plugin directory or a checkpoint whose name is not UTF-8):
  // shown with U+FFFD rather than thrown at the host as nlohmann's type_error.
  return j.dump(2, ' ', /*ensure_ascii=*/false, nlohmann::ordered_json::error_handler_t::replace);
}

std::vector<int64_t> parse_tokens(const std::string& text) {
  std::vector<int64_t> tokens;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(start, end - start);
    size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size()) fail(ErrorKind::Usage, "--tokens: '", item, "' is not an integer");
    tokens.push_back(value);
    start = end + 1;
  }
  return tokens;
}

}  // namespace loadkit
