#pragma once
/// \file
/// The one way the runtime opens a file it reads (torch-free): regular files
/// only, after following symlinks.
///
/// Why: every input loadkit reads — a checkpoint shard, an index, a job file,
/// a tokens or logits file, a plugin — is named by a user, and a name can
/// point anywhere. Opening a FIFO for reading waits for a writer for ever;
/// reading `/dev/zero` or `/dev/urandom` never ends. So the file is opened
/// with O_NONBLOCK (which makes opening a FIFO return at once), checked with
/// fstat on that descriptor (no window between the check and the read) and
/// refused unless it is a regular file, with one line naming it and what it is.
///
/// `ModelConfig::from_file` (the SDK, which sits below the runtime and cannot
/// link it) makes the same three calls for `config.json`.
///
/// The descriptor is also what a checkpoint is read through for as long as it
/// is used (formats/safetensors_file.h): a file renamed over the name later is
/// another inode, and this descriptor goes on reading the one that was opened.

#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

#include "loadkit/error.h"

namespace loadkit {

/// A file's contents as fstat describes them: which inode, how long, last
/// modified when. Equal identities before and after reading mean nobody wrote
/// the file in between (see SafetensorsFile::check_unchanged for what this
/// catches and the one thing it cannot).
struct FileIdentity {
  uint64_t device = 0;
  uint64_t inode = 0;
  uint64_t size = 0;
  int64_t mtime_ns = 0;  ///< st_mtim in nanoseconds
  bool operator==(const FileIdentity&) const = default;
};

/// An open regular file; closes its descriptor when destroyed.
class RegularFile {
 public:
  /// Opens `path` for reading. Fails with `kind` (callers keep their exit
  /// codes: Input for checkpoints, Usage for job files) as
  /// `<path>: <action>: <reason>`, the reason being strerror's text or
  /// "not a regular file (a FIFO)" and the like.
  RegularFile(const std::string& path, ErrorKind kind, std::string_view action = "cannot open");
  /// The same without throwing: the file, or the reason alone (for callers
  /// that report it their own way, such as the plugin registry).
  static std::variant<RegularFile, std::string> try_open(const std::string& path);
  ~RegularFile();
  RegularFile(RegularFile&& other) noexcept;
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;
  RegularFile& operator=(RegularFile&&) = delete;

  int fd() const { return fd_; }
  /// The size fstat gave when the file was opened.
  uint64_t size() const { return size_; }
  /// st_mode as fstat gave it (permission bits included).
  unsigned mode() const { return mode_; }
  /// Identity as fstat gave it when the file was opened.
  const FileIdentity& identity() const { return identity_; }
  /// Identity as fstat gives it now, on the same descriptor (the opened inode, whatever the name
  /// now points to); `why` holds strerror's text when fstat fails.
  bool current_identity(FileIdentity& now, std::string& why) const;
  /// The whole file as bytes (read to its end, however long it has become).
  std::string read_all() const;

 private:
  RegularFile(const std::string& path, ErrorKind kind, std::string_view action, int fd, const FileIdentity& identity,
              unsigned mode);

  std::string path_;
  ErrorKind kind_;
  std::string action_;
  int fd_ = -1;
  uint64_t size_ = 0;
  unsigned mode_ = 0;
  FileIdentity identity_;
};

/// The contents of the regular file `path` (errors as RegularFile's).
std::string read_regular_file(const std::string& path, ErrorKind kind, std::string_view action = "cannot open");

}  // namespace loadkit
