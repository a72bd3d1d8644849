#pragma once
/// \file
/// Our own safetensors reader (torch-free, so its fuzz target builds fast).
///
/// A file is memory-mapped and its whole header is validated before any
/// tensor is handed out: header length within the file, JSON well-formed with
/// no duplicate names, `__metadata__` a string map, every dtype known, shapes
/// non-negative without numel/byte overflow, `data_offsets` ordered, exactly
/// `numel × itemsize` long, contiguous (no gap, no overlap) and covering the
/// data section to its end. Every error names the file and, where there is
/// one, the tensor.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace loadkit::safetensors {

enum class DType { BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64, F8_E4M3, F8_E5M2 };

std::optional<DType> parse_dtype(std::string_view name);
const char* dtype_name(DType dtype);
size_t dtype_size(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  ///< byte offsets within the data section
  uint64_t end = 0;
  uint64_t numel = 0;
  uint64_t bytes() const { return end - begin; }
};

/// Largest header we accept (the reference implementation's limit).
constexpr uint64_t kMaxHeaderBytes = 100u * 1024 * 1024;

class SafetensorsFile {
 public:
  /// Maps `path` read-only and validates it. Only a regular file is opened
  /// (formats/regular_file.h: a FIFO or a device is an Input error naming it);
  /// a file the address space cannot hold is an Other error saying so (the
  /// file is fine, this process's limit is not).
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path);
  /// Validates bytes already in memory; `owner` keeps them alive, `origin` names them.
  static std::shared_ptr<const SafetensorsFile> parse(std::shared_ptr<const void> owner, const uint8_t* data,
                                                      size_t size, const std::string& origin);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  /// Tensors in data order (ascending offsets).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// First byte of `info`'s data inside the mapping.
  const uint8_t* data(const TensorInfo& info) const { return bytes_ + data_start_ + info.begin; }
  /// Offset of `info`'s first byte from the start of the file (for reading it with pread).
  uint64_t file_offset(const TensorInfo& info) const { return data_start_ + info.begin; }
  /// Hints the kernel that the whole data section will be read soon.
  void will_need() const;

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

 private:
  SafetensorsFile() = default;
  void validate();

  std::string path_;
  std::shared_ptr<const void> owner_;
  const uint8_t* bytes_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> by_name_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace loadkit::safetensors
