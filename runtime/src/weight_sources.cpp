#include "weight_sources.h"

#include <ATen/ATen.h>

#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/log.h"
#include "tensor_io.h"

namespace loadkit {

namespace {

constexpr uint64_t kProgressBytes = 1ull << 30;  // report per file when the checkpoint is at least this big

class SafetensorsStream final : public WeightStream {
 public:
  explicit SafetensorsStream(const safetensors::CheckpointFiles& files) : files_(files) {}

  bool next(NamedWeight& out) override {
    while (file_ < files_.files.size()) {
      const auto& file = files_.files[file_];
      if (tensor_ == 0) begin_file(*file);
      if (tensor_ < file->tensors().size()) {
        const auto& info = file->tensors()[tensor_++];
        out.name = info.name;
        out.tensor = view_tensor(file, info);
        out.origin = file->path();
        return true;
      }
      ++file_;
      tensor_ = 0;
    }
    return false;
  }

 private:
  void begin_file(const safetensors::SafetensorsFile& file) {
    file.will_need();
    const std::string line = cat("loading ", file.path(), " (", file_ + 1, "/", files_.files.size(), ", ",
                                 file.file_size() >> 20, " MiB)");
    files_.total_bytes >= kProgressBytes ? log::info(line) : log::debug(line);
  }

  const safetensors::CheckpointFiles& files_;
  size_t file_ = 0;
  size_t tensor_ = 0;
};

}  // namespace

std::unique_ptr<WeightStream> safetensors_stream(const safetensors::CheckpointFiles& files) {
  return std::make_unique<SafetensorsStream>(files);
}

void initialize_dummy_weights(Module& root, uint64_t seed) {
  at::manual_seed(seed);
  for (auto& [name, p] : root.named_parameters()) {
    at::Tensor& data = p->data;
    if (at::isFloatingType(data.scalar_type())) {
      data.uniform_(-1e-3, 1e-3);
    } else {
      data.zero_();
    }
    if (p->sharding.vocab_rows && data.dim() >= 1 && data.numel() > 0) {
      const int64_t rows = p->expected_load_numel / (data.numel() / data.size(0));
      data.narrow(0, rows, data.size(0) - rows).zero_();
    }
    p->loaded_numel = p->expected_load_numel;
  }
}

}  // namespace loadkit
