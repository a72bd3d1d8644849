// loadkit run JOB.yaml: the job is parsed and checked whole (jobs/job_parser.cpp),
// then its steps run in order; the first step that fails stops the job with
// its own exit code, and the message names the step and where it is written.

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "commands.h"
#include "jobs/job.h"
#include "loadkit/causal_lm.h"
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
#include "ranks.h"
#include "sharded_state.h"
#include "tensor_io.h"

namespace loadkit::cli {

namespace {

namespace fs = std::filesystem;
using jobs::Job;
using jobs::Step;
using jobs::StepKind;

/// Outputs may go to folders that do not exist yet (a fresh ${OUT}/run1/...).
void make_parent(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) return;
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) fail(ErrorKind::Other, parent.string(), ": cannot create folder: ", ec.message());
}

/// The tensor `name` of a safetensors file (Input error naming both if absent).
at::Tensor read_tensor(const std::string& path, const std::string& name) {
  for (auto& [n, t] : load_tensors(path))
    if (n == name) return t;
  fail(ErrorKind::Input, path, ": no tensor '", name, "'");
}

class JobRunner {
 public:
  /// Runs on every rank of the job's tp_size; each step is collective (a failure on
  /// one rank stops all), and only rank 0 writes files and prints.
  JobRunner(const Job& job, const LoadOptions& options, Ranks& ranks)
      : job_(job), options_(options), ranks_(ranks), registry_(Registry::search_path(job.plugin_dirs)) {}

  void run() {
    const size_t n = job_.steps.size();
    if (out()) std::cout << "job " << (job_.name.empty() ? job_.file : job_.name) << ": " << n << " steps\n";
    for (size_t i = 0; i < n; ++i) {
      const Step& s = job_.steps[i];
      const std::string label = cat(jobs::where(job_, s.mark), ": step ", i + 1, "/", n, " '", jobs::step_name(s.kind), "'");
      if (ranks_.writes_outputs())
        std::cout << "[" << i + 1 << "/" << n << "] " << jobs::step_name(s.kind) << "\n" << std::flush;
      try {
        ranks_.step(jobs::step_name(s.kind), [&] {
          run_step(s);
          return std::string();
        });
      } catch (const Error& e) {
        throw Error(e.kind(), cat(label, " failed: ", e.what()));
      } catch (const c10::Error& e) {
        throw Error(ErrorKind::Other, cat(label, " failed: ", e.what_without_backtrace()));
      } catch (const std::bad_alloc&) {
        throw Error(ErrorKind::Other, cat(label, " failed: out of host memory"));
      } catch (const std::exception& e) {
        throw Error(ErrorKind::Other, cat(label, " failed: ", e.what()));
      }
    }
    if (out()) std::cout << "job done: " << n << " steps ok\n";
  }

 private:
  void run_step(const Step& s) {
    switch (s.kind) {
      case StepKind::Load: return load();
      case StepKind::Logits: return logits(s);
      case StepKind::Reload: return reload(s);
      case StepKind::Verify: return verify(s);
      case StepKind::SaveSharded: return save_sharded(s);
      case StepKind::Report: return report(s);
    }
  }

  bool out() const { return ranks_.writes_outputs(); }

  void load() {
    model_.reset();  // a second load replaces the model; free the first before building anew
    model_ = LoadedModel::load(options_, registry_);
    last_ = model_->report();
    if (out()) std::cout << "  loaded " << last_.architecture << ": " << last_.tensors << " tensors, " << last_.bytes
              << " bytes in " << last_.seconds << " s on " << last_.device << "\n";
  }

  void logits(const Step& s) {
    std::vector<int64_t> tokens = s.tokens;
    if (!s.tokens_from.empty()) {
      at::Tensor t = read_tensor(s.tokens_from, "tokens");
      if (t.dim() != 1 || t.scalar_type() != at::kLong || t.numel() == 0)
        fail(ErrorKind::Input, s.tokens_from, ": tensor 'tokens' must be a non-empty int64 vector");
      tokens.assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    }
    at::Tensor logits = model_->logits(tokens);  // every rank: the forward is collective
    if (!out()) return;
    make_parent(s.out);
    save_tensors(s.out, {{"logits", logits}});
    std::cout << "  wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << s.out << "\n";
  }

  void reload(const Step& s) {
    last_ = model_->reload(s.from, s.process_weights_after_loading);
    if (out()) std::cout << "  reloaded " << last_.tensors << " tensors from " << (s.from.empty() ? job_.model.path : s.from)
              << " in " << last_.seconds << " s, pointers " << (last_.pointers_stable ? "stable" : "CHANGED") << "\n";
  }

  /// Fails the job (exit 1) when the logits fall outside a bound; files that
  /// cannot be compared (missing, no `logits`, other shapes) are input errors.
  void verify(const Step& s) {
    if (!out()) return;
    at::Tensor ours = read_tensor(s.logits, "logits").to(at::kFloat);
    at::Tensor ref = read_tensor(s.reference, "logits").to(at::kFloat);
    if (ours.sizes() != ref.sizes() || ours.dim() != 2)
      fail(ErrorKind::Input, s.logits, ": logits ", ours.sizes(), " cannot be compared with ", s.reference, "'s ",
           ref.sizes(), " (want the same [tokens, vocab])");
    const double diff = (ours - ref).abs().max().item<double>();
    const double cosine = at::cosine_similarity(ours, ref, /*dim=*/-1).min().item<double>();
    const bool argmax_equal = at::equal(ours.argmax(-1), ref.argmax(-1));
    std::cout << "  " << s.logits << " vs " << s.reference << ": max |diff| " << diff << ", min cosine " << cosine
              << ", argmax " << (argmax_equal ? "equal" : "differs") << "\n";
    if (s.max_abs_diff && !(diff <= *s.max_abs_diff))
      fail(ErrorKind::Other, "max |logits - reference| = ", diff, " exceeds max_abs_diff ", *s.max_abs_diff);
    if (s.min_cosine && !(cosine >= *s.min_cosine))
      fail(ErrorKind::Other, "min cosine(logits, reference) = ", cosine, " is below min_cosine ", *s.min_cosine);
    if (s.argmax && !argmax_equal) fail(ErrorKind::Other, "the argmax of the logits differs from the reference's");
  }

  /// Each rank writes its own files; rank 0 adds the model's config and metadata.
  void save_sharded(const Step& s) {
    std::optional<uint64_t> limit;
    if (s.max_part_size) limit = static_cast<uint64_t>(*s.max_part_size);
    const auto written = save_sharded_state(model_->model(), s.out, ranks_.rank(), options_.sharded_pattern, limit);
    if (!out()) return;
    copy_model_metadata(job_.model.path, s.out);
    std::cout << "  wrote " << written.size() << " sharded-state file(s) of rank 0 to " << s.out << "\n";
  }

  void report(const Step& s) {
    if (!out()) return;
    make_parent(s.path);
    std::ofstream out(s.path);
    out << last_.to_json() << "\n";
    if (!out) fail(ErrorKind::Other, s.path, ": cannot write report");
    std::cout << "  wrote report to " << s.path << "\n";
  }

  const Job& job_;
  const LoadOptions& options_;
  Ranks& ranks_;
  Registry registry_;
  std::unique_ptr<LoadedModel> model_;
  LoadReport last_;  ///< of the latest load or reload
};

}  // namespace

int run(const std::vector<std::string>& args) {
  std::string job_path, log_level;
  po::options_description desc("run");
  desc.add_options()
      ("job", po::value(&job_path)->required(), "YAML job file")
      ("log-level", po::value(&log_level)->default_value("info"), "trace|debug|info|warn|error")
      ("help,h", "show this help");
  po::positional_options_description positional;
  positional.add("job", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(args).options(desc).positional(positional).run(), vm);
    if (vm.count("help")) {
      std::cout << "usage: loadkit run JOB.yaml [--log-level L]\n" << desc;
      return 0;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    fail(ErrorKind::Usage, "run: ", e.what());
  }
  log::set_level(log::parse_level(log_level));
  const Job job = jobs::load_job(job_path);
  CommonOptions common;
  common.plugin_dirs = job.plugin_dirs;
  common.log_level = log_level;
  common.load.model_dir = job.model.path;
  common.load.dtype = job.model.dtype;
  common.load.device = job.model.device;
  common.load.quantization = job.model.quantization;
  common.load.tp_size = job.model.tp_size;
  common.load.load_format = job.model.load_format;
  return run_on_ranks(common, [&](Ranks& ranks) {
    JobRunner(job, common.load, ranks).run();
    return 0;
  });
}

}  // namespace loadkit::cli
