#include "weight_sources.h"

#include <ATen/ATen.h>

#include <string_view>
#include <unordered_map>

#include "loadkit/error.h"
#include "loadkit/module.h"
#include "loadkit/runtime/log.h"
#include "staging/staged_stream.h"
#include "tensor_io.h"

namespace loadkit {

namespace {

constexpr uint64_t kProgressBytes = 1ull << 30;  // report per file when the checkpoint is at least this big

/// Reads tensors into one host buffer, reused while nobody else holds what it last handed out.
/// Why: a fresh allocation per tensor costs its page faults and zeroing on every tensor, which
/// doubled a CPU load's time against reading from a mapping; a reused buffer's pages are warm.
/// A consumer that keeps a tensor (a module that caches its loader calls) keeps its storage
/// alive, and the next tensor then goes to a new buffer: nothing it holds is overwritten.
class HostReader {
 public:
  at::Tensor read(const safetensors::SafetensorsFile& file, const safetensors::TensorInfo& info) {
    const auto bytes = static_cast<int64_t>(info.bytes());
    if (!buffer_.defined() || buffer_.storage().use_count() > 1 || buffer_.numel() < bytes)
      buffer_ = at::empty({std::max<int64_t>(bytes, buffer_.defined() ? buffer_.numel() : 0)}, at::kByte);
    at::Tensor t = buffer_.narrow(0, 0, bytes).view(to_scalar_type(info.dtype)).view(info.shape);
    file.read(info, t.data_ptr());
    return t;
  }

 private:
  at::Tensor buffer_;
};

class SafetensorsStream final : public WeightStream {
 public:
  /// `headers_only`: meta tensors of the headers, nothing read (a validation pass).
  SafetensorsStream(const safetensors::CheckpointFiles& files, bool headers_only)
      : files_(files), headers_only_(headers_only) {}

  bool next(NamedWeight& out) override {
    while (file_ < files_.files.size()) {
      const auto& file = files_.files[file_];
      if (tensor_ == 0 && !headers_only_) begin_file(*file);
      if (tensor_ < file->tensors().size()) {
        const auto& info = file->tensors()[tensor_++];
        out.name = info.name;
        out.tensor = at::Tensor();  // the previous tensor is consumed: free it before reading the next
        out.tensor = headers_only_ ? meta_tensor_of(info) : reader_.read(*file, info);
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
  const bool headers_only_;
  HostReader reader_;
  size_t file_ = 0;
  size_t tensor_ = 0;
};

/// The same tensors in a given order (a reload that keeps each module's weights together).
class OrderedSafetensorsStream final : public WeightStream {
 public:
  OrderedSafetensorsStream(const safetensors::CheckpointFiles& files, const std::vector<std::string>& order) {
    std::unordered_map<std::string_view, std::pair<size_t, const safetensors::TensorInfo*>> by_name;
    for (size_t f = 0; f < files.files.size(); ++f) {
      files.files[f]->will_need();
      for (const auto& info : files.files[f]->tensors()) by_name.emplace(info.name, std::make_pair(f, &info));
    }
    if (order.size() != by_name.size())
      fail(ErrorKind::Other, "ordered stream: an order of ", order.size(), " names for ", by_name.size(), " tensors");
    for (const auto& name : order) {
      auto it = by_name.find(name);
      if (it == by_name.end()) fail(ErrorKind::Other, "ordered stream: no tensor '", name, "' to order");
      items_.push_back(it->second);
    }
    files_ = files.files;
  }

  bool next(NamedWeight& out) override {
    if (pos_ >= items_.size()) return false;
    const auto& [f, info] = items_[pos_++];
    out.name = info->name;
    out.tensor = at::Tensor();  // the previous tensor is consumed: free it before reading the next
    out.tensor = reader_.read(*files_[f], *info);
    out.origin = files_[f]->path();
    return true;
  }

 private:
  std::vector<std::shared_ptr<const safetensors::SafetensorsFile>> files_;
  std::vector<std::pair<size_t, const safetensors::TensorInfo*>> items_;
  HostReader reader_;
  size_t pos_ = 0;
};

}  // namespace

std::unique_ptr<WeightStream> safetensors_stream(const safetensors::CheckpointFiles& files,
                                                 std::vector<std::string> order) {
  if (!order.empty()) return std::make_unique<OrderedSafetensorsStream>(files, order);
  return std::make_unique<SafetensorsStream>(files, /*headers_only=*/false);
}

std::unique_ptr<WeightStream> safetensors_header_stream(const safetensors::CheckpointFiles& files) {
  return std::make_unique<SafetensorsStream>(files, /*headers_only=*/true);
}

std::unique_ptr<WeightStream> open_weight_stream(const safetensors::CheckpointFiles& files, const c10::Device& device,
                                                 const StreamPlan& plan) {
  if (!staging_enabled(device)) return safetensors_stream(files, plan.order);
  StagingOptions staging;
  staging.window_bytes = plan.window_bytes ? plan.window_bytes : safetensors::largest_tensor_bytes(files);
  staging.order = plan.order;
  staging.reserve = plan.reserve;
  return staged_safetensors_stream(files, device, std::move(staging));
}

void initialize_dummy_weights(Module& root, uint64_t seed) {
  at::manual_seed(seed);
  for (auto& [name, p] : root.named_parameters()) {
    at::Tensor& data = p->data;
    if (data.scalar_type() == at::kFloat8_e4m3fn || data.scalar_type() == at::kFloat8_e5m2) {
      data.copy_(at::empty(data.sizes(), data.options().dtype(at::kFloat)).uniform_(-1e-3, 1e-3));  // no fp8 uniform_
    } else if (at::isFloatingType(data.scalar_type())) {
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
