#pragma once
/// \file
/// Our own safetensors reader (torch-free, so its fuzz target builds fast).
///
/// A file's whole header is validated before any tensor is handed out: header
/// length within the file, JSON well-formed with no duplicate names,
/// `__metadata__` a string map, every dtype known, shapes non-negative without
/// numel/byte overflow, `data_offsets` ordered, exactly `numel × itemsize`
/// long, contiguous (no gap, no overlap) and covering the data section to its
/// end. Every error names the file and, where there is one, the tensor. A
/// header byte-identical to one that validated against a data section of the
/// same length is taken as validated (formats/header_cache.h).
///
/// Data is read with `pread` on the descriptor that was validated, never
/// through a mapping. Why: a checkpoint can change while it is read (`cp` or
/// `safetensors.save_file` over it truncate, then write). A page of a mapping
/// past the new end of the file is SIGBUS, which kills the CLI and any Python
/// process that loaded us; a short `pread` is an error we can name. And a
/// rewrite in place must not pass unnoticed: the file's identity (inode, size,
/// modification time in ns) is recorded when it is opened, and every read is
/// followed by `check_unchanged()` (fstat on the same descriptor). A writer
/// that writes another file and renames it over this name (the safe way to
/// replace a checkpoint) changes nothing we read: the descriptor keeps the old
/// inode, consistently, until the source is let go.
///
/// What identity cannot catch: a write that leaves the size and the
/// modification time as they were. The time is the file system's clock at the
/// write; since Linux 6.13 (multigrain timestamps, ext4, xfs, btrfs, tmpfs) a
/// write after our fstat always gets a later one. On older kernels a write in
/// the same clock tick (a few ms) as the file's previous write keeps the old
/// time. A writer that sets the time back on purpose (`touch -d`, `cp -p` of a
/// file of the same size and time) is not caught either. The change time
/// (ctime) is not compared: renaming a new file over the name changes the old
/// inode's ctime (its link count drops), which is exactly the case that must
/// keep working.
///
/// One descriptor is held per file while the checkpoint is in use (a load, a
/// reload), where a mapping held none.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "formats/regular_file.h"

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

/// What validating a header yields (a pure function of its text and the data section's length;
/// formats/header_cache.h keeps it for a header seen again).
struct ValidatedHeader {
  std::vector<TensorInfo> tensors;  ///< in data order (ascending offsets)
  std::map<std::string, size_t, std::less<>> by_name;
  std::map<std::string, std::string> metadata;
};

/// Largest header we accept (the reference implementation's limit).
constexpr uint64_t kMaxHeaderBytes = 100u * 1024 * 1024;

class SafetensorsFile {
 public:
  /// Opens `path` and validates its header, read with pread. Only a regular
  /// file is opened (formats/regular_file.h: a FIFO or a device is an Input
  /// error naming it).
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path);
  /// Validates bytes already in memory (a whole file); `owner` keeps them alive, `origin` names them.
  static std::shared_ptr<const SafetensorsFile> parse(std::shared_ptr<const void> owner, const uint8_t* data,
                                                      size_t size, const std::string& origin);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  /// Tensors in data order (ascending offsets).
  const std::vector<TensorInfo>& tensors() const { return header_->tensors; }
  const TensorInfo* find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return header_->metadata; }
  /// Offset of `info`'s first byte from the start of the file.
  uint64_t file_offset(const TensorInfo& info) const { return data_start_ + info.begin; }

  /// Reads bytes [offset, offset + n) of `info`'s data into `dst`: pread on the validated
  /// descriptor (parsed bytes: a copy). Returns "" or why not, without the file's or the
  /// tensor's name (the caller adds them): a read error, or the file ending early — it was
  /// truncated after validation. Safe from several threads at once. Does not check identity.
  std::string try_read(const TensorInfo& info, uint64_t offset, void* dst, uint64_t n) const noexcept;
  /// All of `info`'s data into `dst`, then check_unchanged(): an Input error naming the file and
  /// the tensor when the data could not be read as it was validated.
  void read(const TensorInfo& info, void* dst) const;
  /// An Input error `<path>: changed while it was read (...)` unless fstat on the validated
  /// descriptor still gives the identity it had when it was opened. Call after reading.
  void check_unchanged() const;
  /// Tells the kernel the whole file will be read soon, in order (readahead).
  void will_need() const;

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

 private:
  SafetensorsFile() = default;
  /// check_unchanged() without counting a tensor read (the test hook counts those).
  void check_identity() const;
  /// The length prefix against the file's size: where the data section starts.
  void check_header_length(uint64_t header_len);
  void validate(std::string_view header_text);

  std::string path_;
  std::optional<RegularFile> file_;    ///< an opened file: read through this descriptor
  std::shared_ptr<const void> owner_;  ///< parsed bytes: kept alive here
  const uint8_t* bytes_ = nullptr;
  FileIdentity identity_;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  std::shared_ptr<const ValidatedHeader> header_;  ///< shared with header_cache.h
  mutable std::atomic<uint64_t> checks_{0};  ///< check_unchanged() calls that passed (the test hook counts them)
  bool change_hook_ = false;  ///< the test hook was asked for when the file was opened (change_hook.h)
};

}  // namespace loadkit::safetensors
