#include "formats/change_hook.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string_view>

#include "formats/regular_file.h"
#include "loadkit/error.h"

namespace loadkit::safetensors::testing {

namespace {

namespace fs = std::filesystem;

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec1, ec2;
  const fs::path pa = fs::weakly_canonical(a, ec1), pb = fs::weakly_canonical(b, ec2);
  return ec1 || ec2 ? a == b : pa == pb;
}

void write_all(int fd, const std::string& bytes, uint64_t offset, const std::string& path) {
  uint64_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail(ErrorKind::Other, path, ": test hook: cannot write: ", std::strerror(errno));
    done += static_cast<uint64_t>(n);
  }
}

/// The file with every byte from `data_start` on inverted: a different version of the same layout.
std::string inverted(const std::string& path, uint64_t data_start) {
  std::string bytes = read_regular_file(path, ErrorKind::Other, "test hook: cannot read");
  for (size_t i = data_start; i < bytes.size(); ++i) bytes[i] = static_cast<char>(~bytes[i]);
  return bytes;
}

void change(std::string_view how, const std::string& path, uint64_t data_start) {
  if (how == "truncate") {
    const uint64_t size = fs::file_size(path);
    if (::truncate(path.c_str(), static_cast<off_t>(data_start + (size - data_start) / 2)) != 0)
      fail(ErrorKind::Other, path, ": test hook: cannot truncate: ", std::strerror(errno));
  } else if (how == "rewrite") {
    const std::string bytes = inverted(path, data_start);
    const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
    if (fd < 0) fail(ErrorKind::Other, path, ": test hook: cannot open: ", std::strerror(errno));
    write_all(fd, bytes.substr(data_start), data_start, path);
    ::close(fd);
  } else if (how == "rename") {
    const std::string bytes = inverted(path, data_start);
    const std::string temporary = path + ".test-hook-new";
    const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) fail(ErrorKind::Other, temporary, ": test hook: cannot create: ", std::strerror(errno));
    write_all(fd, bytes, 0, temporary);
    ::close(fd);
    if (::rename(temporary.c_str(), path.c_str()) != 0)
      fail(ErrorKind::Other, path, ": test hook: cannot rename over it: ", std::strerror(errno));
  } else {
    fail(ErrorKind::Usage, "LOADKIT_TEST_CHANGE_FILE: unknown change '", how, "' (truncate, rewrite or rename)");
  }
}

}  // namespace

bool enabled() {
  const char* spec = std::getenv("LOADKIT_TEST_CHANGE_FILE");
  return spec && *spec;
}

void change_after_checks(const std::string& path, uint64_t data_start, uint64_t checks) {
  const char* spec = std::getenv("LOADKIT_TEST_CHANGE_FILE");
  if (!spec || !*spec) return;
  const std::string_view text(spec);
  const size_t a = text.find(':');
  const size_t b = a == std::string_view::npos ? a : text.find(':', a + 1);
  if (b == std::string_view::npos)
    fail(ErrorKind::Usage, "LOADKIT_TEST_CHANGE_FILE: expected <how>:<after>:<path>, got '", text, "'");
  const std::string after(text.substr(a + 1, b - a - 1));
  char* end = nullptr;
  const uint64_t n = std::strtoull(after.c_str(), &end, 10);
  if (after.empty() || *end) fail(ErrorKind::Usage, "LOADKIT_TEST_CHANGE_FILE: '", after, "' is not a count");
  if (n != checks || !same_file(path, std::string(text.substr(b + 1)))) return;
  change(text.substr(0, a), path, data_start);
}

}  // namespace loadkit::safetensors::testing
