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
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/log.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
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
  explicit JobRunner(const Job& job) : job_(job), registry_(Registry::search_path(job.plugin_dirs)) {}

  void run() {
    const size_t n = job_.steps.size();
    std::cout << "job " << (job_.name.empty() ? job_.file : job_.name) << ": " << n << " steps\n";
    for (size_t i = 0; i < n; ++i) {
      const Step& s = job_.steps[i];
      const std::string label = cat(jobs::where(job_, s.mark), ": step ", i + 1, "/", n, " '", jobs::step_name(s.kind), "'");
      std::cout << "[" << i + 1 << "/" << n << "] " << jobs::step_name(s.kind) << "\n" << std::flush;
      try {
        run_step(s);
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
    std::cout << "job done: " << n << " steps ok\n";
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

  void load() {
    LoadOptions options;
    options.model_dir = job_.model.path;
    options.dtype = job_.model.dtype;
    options.device = job_.model.device;
    options.quantization = job_.model.quantization;
    options.tp_size = job_.model.tp_size;
    options.load_format = job_.model.load_format;
    model_.reset();  // a second load replaces the model; free the first before building anew
    model_ = LoadedModel::load(options, registry_);
    last_ = model_->report();
    std::cout << "  loaded " << last_.architecture << ": " << last_.tensors << " tensors, " << last_.bytes
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
    at::Tensor logits = model_->logits(tokens);
    make_parent(s.out);
    save_tensors(s.out, {{"logits", logits}});
    std::cout << "  wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << s.out << "\n";
  }

  void reload(const Step& s) {
    last_ = model_->reload(s.from, s.process_weights_after_loading);
    std::cout << "  reloaded " << last_.tensors << " tensors from " << (s.from.empty() ? job_.model.path : s.from)
              << " in " << last_.seconds << " s, pointers " << (last_.pointers_stable ? "stable" : "CHANGED") << "\n";
  }

  /// Fails the job (exit 1) when the logits fall outside a bound; files that
  /// cannot be compared (missing, no `logits`, other shapes) are input errors.
  void verify(const Step& s) {
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

  // Seam for issue 6 (save-sharded): the step is parsed and checked here;
  // writing the per-rank files belongs to the sharded-state writer.
  void save_sharded(const Step&) { fail(ErrorKind::Usage, "save_sharded: not available in this build"); }

  void report(const Step& s) {
    make_parent(s.path);
    std::ofstream out(s.path);
    out << last_.to_json() << "\n";
    if (!out) fail(ErrorKind::Other, s.path, ": cannot write report");
    std::cout << "  wrote report to " << s.path << "\n";
  }

  const Job& job_;
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
  JobRunner(job).run();
  return 0;
}

}  // namespace loadkit::cli
