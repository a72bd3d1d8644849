#include "formats/safetensors_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "formats/change_hook.h"
#include "formats/regular_file.h"
#include "formats/header_cache.h"
#include "formats/safetensors_header.h"
#include "loadkit/error.h"

namespace loadkit::safetensors {

namespace {

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {DType::BOOL, "BOOL", 1},       {DType::U8, "U8", 1},     {DType::I8, "I8", 1},
    {DType::I16, "I16", 2},         {DType::U16, "U16", 2},   {DType::I32, "I32", 4},
    {DType::U32, "U32", 4},         {DType::I64, "I64", 8},   {DType::U64, "U64", 8},
    {DType::F16, "F16", 2},         {DType::BF16, "BF16", 2}, {DType::F32, "F32", 4},
    {DType::F64, "F64", 8},         {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};

[[noreturn]] void bad(const std::string& origin, const std::string& what) {
  fail(ErrorKind::Input, origin, ": ", what);
}

/// Reads exactly `n` bytes at `offset`: "" or why not (strerror's text, or the file ending first).
std::string pread_exact(int fd, uint8_t* dst, uint64_t n, uint64_t offset) {
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1u << 30));  // Linux reads at most ~2 GiB per call
    const ssize_t got = ::pread(fd, dst, chunk, static_cast<off_t>(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      return cat("read error at byte ", offset, ": ", std::strerror(errno));
    }
    if (got == 0) return cat("the file ends at byte ", offset, ", before the data does");
    dst += got;
    n -= static_cast<uint64_t>(got);
    offset += static_cast<uint64_t>(got);
  }
  return {};
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

std::optional<DType> parse_dtype(std::string_view name) {
  for (const auto& e : kDTypes)
    if (name == e.name) return e.dtype;
  return std::nullopt;
}

const char* dtype_name(DType dtype) {
  for (const auto& e : kDTypes)
    if (e.dtype == dtype) return e.name;
  return "?";
}

size_t dtype_size(DType dtype) {
  for (const auto& e : kDTypes)
    if (e.dtype == dtype) return e.size;
  return 0;
}

SafetensorsFile::~SafetensorsFile() = default;

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const RegularFile& opened = file->file_.emplace(path, ErrorKind::Input);
  file->identity_ = opened.identity();
  file->size_ = file->identity_.size;
  if (file->size_ == 0) bad(path, "empty file (0 bytes), not a safetensors file");
  uint8_t prefix[8] = {};
  if (file->size_ >= 8) {
    if (std::string why = pread_exact(opened.fd(), prefix, 8, 0); !why.empty()) bad(path, "cannot read its header: " + why);
  }
  file->check_header_length(file->size_ >= 8 ? read_u64_le(prefix) : 0);
  std::string header(file->data_start_ - 8, '\0');
  if (std::string why = pread_exact(opened.fd(), reinterpret_cast<uint8_t*>(header.data()), header.size(), 8);
      !why.empty())
    bad(path, "cannot read its header: " + why);
  file->validate(header);
  file->check_identity();  // the header read is the version the offsets describe
  file->change_hook_ = testing::enabled();
  if (file->change_hook_) testing::change_after_checks(path, file->data_start_, 0);
  return file;
}

std::shared_ptr<const SafetensorsFile> SafetensorsFile::parse(std::shared_ptr<const void> owner, const uint8_t* data,
                                                              size_t size, const std::string& origin) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = origin;
  file->owner_ = std::move(owner);
  file->bytes_ = data;
  file->size_ = size;
  file->check_header_length(size >= 8 ? read_u64_le(data) : 0);
  file->validate(std::string_view(reinterpret_cast<const char*>(data) + 8, file->data_start_ - 8));
  return file;
}

void SafetensorsFile::check_header_length(uint64_t header_len) {
  const std::string& origin = path_;
  if (size_ < 8) bad(origin, cat("file of ", size_, " bytes is too small for a safetensors header"));
  if (header_len == 0) bad(origin, "header length is 0");
  if (header_len > kMaxHeaderBytes) bad(origin, cat("header length ", header_len, " exceeds the 100 MiB limit"));
  if (header_len > size_ - 8)
    bad(origin, cat("header length ", header_len, " runs past the end of the file (", size_, " bytes)"));
  data_start_ = 8 + header_len;
}

void SafetensorsFile::validate(std::string_view header_text) {
  const std::string& origin = path_;
  const uint64_t data_len = size_ - data_start_;
  if ((header_ = find_validated(header_text, data_len))) return;  // this text and length validated before
  auto validated = std::make_shared<ValidatedHeader>();
  std::vector<TensorInfo>& tensors = validated->tensors;

  // Each entry is checked as the one pass over the JSON reaches its end (safetensors_header.h):
  // the first problem named is the first in the header.
  read_header(header_text, origin, validated->metadata, [&](const HeaderEntry& entry) {
    const std::string& name = entry.name;
    auto where = [&] { return cat("tensor '", name, "': "); };
    if (name.empty()) bad(origin, "a tensor has an empty name");
    if (!entry.is_object) bad(origin, where() + "entry must be an object");
    if (!entry.has_dtype) bad(origin, where() + "missing string 'dtype'");
    auto dtype = parse_dtype(entry.dtype);
    if (!dtype) bad(origin, where() + cat("unknown dtype '", entry.dtype, "'"));

    TensorInfo info;
    info.name = name;
    info.dtype = *dtype;
    if (!entry.has_shape) bad(origin, where() + "missing array 'shape'");
    uint64_t numel = 1;
    for (const HeaderEntry::Dim& d : entry.shape) {
      if (d.kind == HeaderEntry::Dim::Kind::NotInteger) bad(origin, where() + "shape entries must be integers");
      if (d.kind == HeaderEntry::Dim::Kind::Unsigned ? d.unsigned_value > static_cast<uint64_t>(INT64_MAX)
                                                      : d.signed_value < 0)
        bad(origin, where() + cat("shape has a negative or out-of-range dimension ",
                                  d.kind == HeaderEntry::Dim::Kind::Unsigned ? std::to_string(d.unsigned_value)
                                                                             : std::to_string(d.signed_value)));
      const auto dim = d.kind == HeaderEntry::Dim::Kind::Unsigned ? static_cast<int64_t>(d.unsigned_value) : d.signed_value;
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel))
        bad(origin, where() + "shape's element count overflows");
      info.shape.push_back(dim);
    }
    info.numel = numel;
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(*dtype)), &bytes) || numel > (1ull << 62))
      bad(origin, where() + "shape's byte size overflows");

    if (!entry.has_offsets) bad(origin, where() + "'data_offsets' must be two non-negative integers");
    info.begin = entry.offsets[0];
    info.end = entry.offsets[1];
    if (info.end < info.begin)
      bad(origin, where() + cat("data_offsets [", info.begin, ", ", info.end, "] are reversed"));
    if (info.end - info.begin != bytes)
      bad(origin, where() + cat("data_offsets span ", info.end - info.begin, " bytes but ", dtype_name(*dtype), " ",
                                "shape holds ", bytes, " bytes"));
    if (info.end > data_len)
      bad(origin, where() + cat("data ends at byte ", info.end, " but the data section holds only ", data_len,
                                " bytes (file truncated?)"));
    tensors.push_back(std::move(info));
  });

  std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    return a.end != b.end ? a.end < b.end : a.name < b.name;  // empty tensors at one offset: by name
  });
  uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : tensors) {
    if (t.begin < expected)
      bad(origin, cat("tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end, "] overlap tensor '",
                      previous->name, "' [", previous->begin, ", ", previous->end, "]"));
    if (t.begin > expected)
      bad(origin, cat("tensor '", t.name, "': data starts at byte ", t.begin, ", leaving a gap after byte ", expected));
    expected = t.end;
    previous = &t;
  }
  if (expected != data_len)
    bad(origin, cat("tensors cover ", expected, " bytes but the data section holds ", data_len, " bytes"));
  for (size_t i = 0; i < tensors.size(); ++i) validated->by_name.emplace(tensors[i].name, i);
  header_ = validated;
  keep_validated(header_text, data_len, std::move(validated));
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = header_->by_name.find(name);
  return it == header_->by_name.end() ? nullptr : &header_->tensors[it->second];
}

std::string SafetensorsFile::try_read(const TensorInfo& info, uint64_t offset, void* dst, uint64_t n) const noexcept {
  try {
    if (offset > info.bytes() || n > info.bytes() - offset)
      return cat("bytes [", offset, ", +", n, ") lie outside the tensor's ", info.bytes());
    if (!file_) {
      std::memcpy(dst, bytes_ + file_offset(info) + offset, n);
      return {};
    }
    std::string why = pread_exact(file_->fd(), static_cast<uint8_t*>(dst), n, file_offset(info) + offset);
    if (!why.empty() && why.starts_with("the file ends"))
      why += cat(" (it held ", size_, " bytes when it was validated: truncated since)");
    return why;
  } catch (...) {  // composing the message ran out of memory; reader threads must not throw
    return "out of memory";  // short enough to need no allocation
  }
}

void SafetensorsFile::read(const TensorInfo& info, void* dst) const {
  const std::string why = try_read(info, 0, dst, info.bytes());
  if (!why.empty()) {
    check_identity();  // a truncation is named as the change it is
    bad(path_, cat("reading tensor '", info.name, "': ", why));
  }
  check_unchanged();
}

void SafetensorsFile::check_unchanged() const {
  check_identity();
  const uint64_t checks = checks_.fetch_add(1) + 1;
  if (change_hook_) testing::change_after_checks(path_, data_start_, checks);
}

void SafetensorsFile::check_identity() const {
  if (!file_) return;
  FileIdentity now;
  std::string why;
  if (!file_->current_identity(now, why)) bad(path_, "cannot check whether it changed while it was read: " + why);
  if (now != identity_) {
    std::string how;
    if (now.size != identity_.size)
      how = cat("its size went from ", identity_.size, " to ", now.size, " bytes");
    else
      how = cat("it was modified after it was validated (mtime ", identity_.mtime_ns, " -> ", now.mtime_ns, " ns)");
    bad(path_, cat("changed while it was read: ", how, "; write a new file and rename it over the old one instead"));
  }
}

void SafetensorsFile::will_need() const {
  if (!file_) return;
  ::posix_fadvise(file_->fd(), 0, 0, POSIX_FADV_SEQUENTIAL);
  ::posix_fadvise(file_->fd(), 0, 0, POSIX_FADV_WILLNEED);
}

}  // namespace loadkit::safetensors
