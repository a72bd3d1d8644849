// loadkit load / logits

#include <ATen/ATen.h>

#include <fstream>
#include <iostream>

#include "commands.h"
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
#include "ranks.h"
#include "tensor_io.h"

namespace loadkit::cli {

namespace {

void write_report(const std::string& path, const LoadReport& report, const std::vector<std::string>& timings) {
  std::ofstream out(path);
  out << report_json(report, timings) << "\n";
  if (!out) fail(ErrorKind::Other, path, ": cannot write report");
}

void print_summary(const std::string& model, const LoadReport& r) {
  std::cout << "loaded " << r.architecture << " from " << model << ": " << r.tensors << " tensors, " << r.bytes
            << " bytes in " << r.seconds << " s (" << r.gb_per_s() << " GB/s) on " << r.device << " as " << r.dtype
            << (r.quantization == "none" ? "" : " quantized " + r.quantization) << "\n";
}

}  // namespace

int load(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string report_path;
  po::options_description desc("load");
  add_common(desc, common);
  desc.add_options()
      ("model", po::value(&common.load.model_dir)->required(), "checkpoint directory")
      ("report", po::value(&report_path), "write the load report (JSON) here");
  if (!parse("load", args, desc, common)) return 0;
  refuse_output_into("load", "report", report_path, common.load.model_dir, "the model directory");

  return run_on_ranks(common, [&](Ranks& ranks) {
    Registry registry(Registry::search_path(common.plugin_dirs));
    std::unique_ptr<LoadedModel> model;
    const auto timings = ranks.step("load", [&] {
      model = LoadedModel::load(common.load, registry);
      return timing_payload(model->report());
    });
    if (!ranks.writes_outputs()) return 0;
    print_summary(common.load.model_dir, model->report());
    if (!report_path.empty()) write_report(report_path, model->report(), timings);
    return 0;
  });
}

int reload(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string from, tokens_text, out_path, report_path;
  bool no_process = false, journal = false;
  po::options_description desc("reload");
  add_common(desc, common);
  desc.add_options()
      ("model", po::value(&common.load.model_dir)->required(), "checkpoint directory to load first")
      ("from", po::value(&from)->required(), "checkpoint directory to reload from, in place")
      ("no-process", po::bool_switch(&no_process), "the source is already in kernel format: copy it straight in")
      ("journal", po::bool_switch(&journal),
       "keep a host copy of each layer before writing it, so that a failed reload puts the model back "
       "bit-identically (costs this rank's kernel bytes in host memory)")
      ("tokens", po::value(&tokens_text), "comma-separated token ids for logits after the reload")
      ("out", po::value(&out_path), "safetensors file for those logits")
      ("report", po::value(&report_path), "write the reload report (JSON) here");
  if (!parse("reload", args, desc, common)) return 0;
  if (tokens_text.empty() != out_path.empty()) fail(ErrorKind::Usage, "reload: --tokens and --out go together");
  for (auto [option, path] : {std::pair{"out", &out_path}, std::pair{"report", &report_path}}) {
    refuse_output_into("reload", option, *path, common.load.model_dir, "the model directory");
    refuse_output_into("reload", option, *path, from, "the checkpoint reloaded from");
  }
  const auto tokens = tokens_text.empty() ? std::vector<int64_t>{} : parse_tokens(tokens_text);

  return run_on_ranks(common, [&](Ranks& ranks) {
    Registry registry(Registry::search_path(common.plugin_dirs));
    std::unique_ptr<LoadedModel> model;
    ranks.step("load", [&] {
      model = LoadedModel::load(common.load, registry);
      return std::string();
    });
    const auto timings = ranks.step("reload", [&] {
      try {
        return timing_payload(model->reload(from, !no_process, journal ? Rollback::Journal : Rollback::None));
      } catch (const std::exception&) {
        // The report of a failed reload says what it wrote (written_modules) and why it failed.
        if (!report_path.empty() && ranks.writes_outputs()) write_report(report_path, model->report(), {});
        throw;
      }
    });
    const LoadReport& r = model->report();
    at::Tensor logits;
    if (!out_path.empty()) logits = model->logits(tokens);  // every rank: the forward is collective
    if (!ranks.writes_outputs()) return 0;
    std::cout << "reloaded " << r.architecture << " from " << from << ": " << r.tensors << " tensors, " << r.bytes
            << " bytes in " << r.seconds << " s (" << r.gb_per_s() << " GB/s), pointers "
            << (r.pointers_stable ? "stable" : "CHANGED") << "\n";
    if (!report_path.empty()) write_report(report_path, r, timings);
    if (!out_path.empty()) {
      save_tensors(out_path, {{"logits", logits}});
      std::cout << "wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << out_path << "\n";
    }
    return 0;
  });
}

int logits(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string tokens_text, out_path;
  po::options_description desc("logits");
  add_common(desc, common);
  desc.add_options()
      ("model", po::value(&common.load.model_dir)->required(), "checkpoint directory")
      ("tokens", po::value(&tokens_text)->required(), "comma-separated token ids, e.g. 1,2,3")
      ("out", po::value(&out_path)->required(), "safetensors file to write tensor 'logits' to");
  if (!parse("logits", args, desc, common)) return 0;
  refuse_output_into("logits", "out", out_path, common.load.model_dir, "the model directory");

  const auto tokens = parse_tokens(tokens_text);
  return run_on_ranks(common, [&](Ranks& ranks) {
    Registry registry(Registry::search_path(common.plugin_dirs));
    std::unique_ptr<LoadedModel> model;
    ranks.step("load", [&] {
      model = LoadedModel::load(common.load, registry);
      return std::string();
    });
    at::Tensor logits = model->logits(tokens);  // every rank: the forward is collective
    if (!ranks.writes_outputs()) return 0;
    save_tensors(out_path, {{"logits", logits}});
    std::cout << "wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << out_path << "\n";
    return 0;
  });
}

}  // namespace loadkit::cli
