#include "formats/regular_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace loadkit {

namespace {

const char* file_type_name(mode_t mode) {
  switch (mode & S_IFMT) {
    case S_IFDIR: return "a directory";
    case S_IFIFO: return "a FIFO";
    case S_IFCHR: return "a character device";
    case S_IFBLK: return "a block device";
    case S_IFSOCK: return "a socket";
    default: return "of unknown type";
  }
}

FileIdentity identity_of(const struct stat& st) {
  return {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino), static_cast<uint64_t>(st.st_size),
          static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
}

/// A descriptor of the regular file at `path`, or -1 with `why` set.
int open_regular(const std::string& path, struct stat& st, std::string& why) {
  // O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer. It changes
  // nothing for reading a regular file.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    why = std::strerror(errno);
    return -1;
  }
  if (fstat(fd, &st) != 0) {
    why = std::strerror(errno);
    ::close(fd);
    return -1;
  }
  if (!S_ISREG(st.st_mode)) {
    why = cat("not a regular file (", file_type_name(st.st_mode), ")");
    ::close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

RegularFile::RegularFile(const std::string& path, ErrorKind kind, std::string_view action)
    : path_(path), kind_(kind), action_(action) {
  struct stat st {};
  std::string why;
  fd_ = open_regular(path, st, why);
  if (fd_ < 0) fail(kind, path, ": ", action, ": ", why);
  identity_ = identity_of(st);
  size_ = identity_.size;
  mode_ = st.st_mode;
}

RegularFile::RegularFile(const std::string& path, ErrorKind kind, std::string_view action, int fd,
                         const FileIdentity& identity, unsigned mode)
    : path_(path), kind_(kind), action_(action), fd_(fd), size_(identity.size), mode_(mode), identity_(identity) {}

std::variant<RegularFile, std::string> RegularFile::try_open(const std::string& path) {
  struct stat st {};
  std::string why;
  const int fd = open_regular(path, st, why);
  if (fd < 0) return why;
  return RegularFile(path, ErrorKind::Input, "cannot read", fd, identity_of(st), st.st_mode);
}

bool RegularFile::current_identity(FileIdentity& now, std::string& why) const {
  struct stat st {};
  if (fstat(fd_, &st) != 0) {
    why = std::strerror(errno);
    return false;
  }
  now = identity_of(st);
  return true;
}

RegularFile::RegularFile(RegularFile&& other) noexcept
    : path_(std::move(other.path_)),
      kind_(other.kind_),
      action_(std::move(other.action_)),
      fd_(other.fd_),
      size_(other.size_),
      mode_(other.mode_),
      identity_(other.identity_) {
  other.fd_ = -1;
}

RegularFile::~RegularFile() {
  if (fd_ >= 0) ::close(fd_);
}

std::string RegularFile::read_all() const {
  std::string bytes(size_, '\0');
  uint64_t done = 0;
  for (;;) {
    if (done == bytes.size()) bytes.resize(bytes.size() + 4096 + bytes.size() / 2);  // the file grew
    const ssize_t n = ::pread(fd_, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(kind_, path_, ": ", action_, ": read error: ", std::strerror(errno));
    if (n == 0) break;
    done += static_cast<uint64_t>(n);
  }
  bytes.resize(done);
  return bytes;
}

std::string read_regular_file(const std::string& path, ErrorKind kind, std::string_view action) {
  return RegularFile(path, kind, action).read_all();
}

}  // namespace loadkit
