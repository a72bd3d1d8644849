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
