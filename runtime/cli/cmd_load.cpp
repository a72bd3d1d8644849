// loadkit load / logits

#include <ATen/ATen.h>

#include <fstream>
#include <iostream>

#include "commands.h"
#include "loadkit/error.h"
#include "loadkit/runtime/engine.h"
#include "loadkit/runtime/registry.h"
#include "options.h"
#include "tensor_io.h"

namespace loadkit::cli {

namespace {

void write_report(const std::string& path, const LoadReport& report) {
  std::ofstream out(path);
  out << report.to_json() << "\n";
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

  Registry registry(Registry::search_path(common.plugin_dirs));
  auto model = LoadedModel::load(common.load, registry);
  print_summary(common.load.model_dir, model->report());
  if (!report_path.empty()) write_report(report_path, model->report());
  return 0;
}

int reload(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string from, tokens_text, out_path, report_path;
  bool no_process = false;
  po::options_description desc("reload");
  add_common(desc, common);
  desc.add_options()
      ("model", po::value(&common.load.model_dir)->required(), "checkpoint directory to load first")
      ("from", po::value(&from)->required(), "checkpoint directory to reload from, in place")
      ("no-process", po::bool_switch(&no_process), "the source is already in kernel format: copy it straight in")
      ("tokens", po::value(&tokens_text), "comma-separated token ids for logits after the reload")
      ("out", po::value(&out_path), "safetensors file for those logits")
      ("report", po::value(&report_path), "write the reload report (JSON) here");
  if (!parse("reload", args, desc, common)) return 0;
  if (tokens_text.empty() != out_path.empty()) fail(ErrorKind::Usage, "reload: --tokens and --out go together");
  const auto tokens = tokens_text.empty() ? std::vector<int64_t>{} : parse_tokens(tokens_text);

  Registry registry(Registry::search_path(common.plugin_dirs));
  auto model = LoadedModel::load(common.load, registry);
  const LoadReport& r = model->reload(from, !no_process);
  std::cout << "reloaded " << r.architecture << " from " << from << ": " << r.tensors << " tensors, " << r.bytes
            << " bytes in " << r.seconds << " s (" << r.gb_per_s() << " GB/s), pointers "
            << (r.pointers_stable ? "stable" : "CHANGED") << "\n";
  if (!report_path.empty()) write_report(report_path, r);
  if (!out_path.empty()) {
    at::Tensor logits = model->logits(tokens);
    save_tensors(out_path, {{"logits", logits}});
    std::cout << "wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << out_path << "\n";
  }
  return 0;
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

  const auto tokens = parse_tokens(tokens_text);
  Registry registry(Registry::search_path(common.plugin_dirs));
  auto model = LoadedModel::load(common.load, registry);
  at::Tensor logits = model->logits(tokens);
  save_tensors(out_path, {{"logits", logits}});
  std::cout << "wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << out_path << "\n";
  return 0;
}

}  // namespace loadkit::cli
