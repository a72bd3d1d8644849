// A C++ host of loadkit — what an inference server, or a trainer's colocated
// engine, does with the runtime — built against the installed package alone:
//
//   loadkit_host --model DIR --update-from DIR2 --tokens 1,2,3 --out logits.safetensors
//                [--device cpu|cuda|cuda:N] [--quantization none|fp8|int8] [--plugin-dir D]
//
//  1. loads DIR through the plugin that serves its architecture (the shipped
//     plugins next to the installed runtime, or D's);
//  2. holds DIR2's weights in memory, as a trainer holds its parameters after
//     an optimizer step, and updates the loaded model from them one layer at a
//     time (begin_update / update / finish_update): every weight goes through
//     the model's own loaders, in place, and every kernel tensor keeps its
//     storage;
//  3. prints the update's report (JSON, on stdout) and writes the logits of
//     --tokens after the update to --out.
//
// A failure prints one line on stderr and exits with loadkit's exit code.

#include <c10/core/GradMode.h>

#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <loadkit/error.h>
#include <loadkit/runtime/engine.h>
#include <loadkit/runtime/failure.h>
#include <loadkit/runtime/registry.h>
#include <loadkit/runtime/tensor_files.h>
#include <loadkit/runtime/weight_sync.h>

namespace {

struct Args {
  std::string model, update_from, tokens, out, device = "cpu", quantization = "none";
  std::vector<std::string> plugin_dirs;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string key = argv[i];
    if (i + 1 >= argc) loadkit::fail(loadkit::ErrorKind::Usage, key, ": missing value");
    const std::string value = argv[++i];
    if (key == "--model") a.model = value;
    else if (key == "--update-from") a.update_from = value;
    else if (key == "--tokens") a.tokens = value;
    else if (key == "--out") a.out = value;
    else if (key == "--device") a.device = value;
    else if (key == "--quantization") a.quantization = value;
    else if (key == "--plugin-dir") a.plugin_dirs.push_back(value);
    else loadkit::fail(loadkit::ErrorKind::Usage, "unknown option ", key);
  }
  if (a.model.empty() || a.update_from.empty() || a.tokens.empty() || a.out.empty())
    loadkit::fail(loadkit::ErrorKind::Usage, "usage: loadkit_host --model DIR --update-from DIR2 --tokens 1,2,3 --out F");
  return a;
}

int run(const Args& a) {
  c10::AutoGradMode no_grad(false);
  // The registry holds the plugin libraries; it must outlive every model it made.
  loadkit::Registry registry(loadkit::Registry::search_path(a.plugin_dirs));
  loadkit::LoadOptions options;
  options.model_dir = a.model;
  options.device = a.device;
  options.quantization = a.quantization;
  auto model = loadkit::LoadedModel::load(options, registry);
  std::cerr << "loaded " << model->report().architecture << " from " << a.model << " ("
            << model->report().tensors << " tensors)\n";

  // The trainer's side: weights in memory, named as in the checkpoint, grouped by layer.
  std::map<std::string, std::vector<loadkit::NamedWeight>> buckets;
  for (auto& w : loadkit::read_checkpoint(a.update_from)) buckets[loadkit::layer_of(w.name)].push_back(std::move(w));

  // The engine's side: one update session, a chunk per layer. Each chunk is validated whole
  // before it is applied; the tensors stay alive until finish_update() (Borrowed::UntilFinish).
  model->begin_update();
  for (const auto& [layer, chunk] : buckets) model->update(chunk);
  const loadkit::LoadReport& report = model->finish_update();
  std::cout << report.to_json() << std::endl;

  const at::Tensor logits = model->logits(loadkit::parse_tokens(a.tokens));
  loadkit::save_tensors(a.out, {{"logits", logits}});
  std::cerr << "wrote logits [" << logits.size(0) << ", " << logits.size(1) << "] to " << a.out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (...) {
    const loadkit::Failure failure = loadkit::current_failure();
    std::cerr << "loadkit_host: error: " << failure.message << std::endl;
    return loadkit::exit_code(failure.kind);
  }
}
