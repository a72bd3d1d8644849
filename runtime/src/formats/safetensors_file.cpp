#include "formats/safetensors_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "formats/change_hook.h"
#include "formats/regular_file.h"
#include "loadkit/error.h"

namespace loadkit::safetensors {

using nlohmann::json;

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

/// The first top-level key of `text` seen before (empty when none); throws json::parse_error for
/// text that is no JSON, with the message json::parse gives. Keys below the top level are skipped.
std::string first_duplicate_key(std::string_view text) {
  struct Keys : nlohmann::json_sax<json> {
    int depth = 0;
    std::unordered_set<std::string> seen;
    std::string duplicate;
    bool null() override { return true; }
    bool boolean(bool) override { return true; }
    bool number_integer(number_integer_t) override { return true; }
    bool number_unsigned(number_unsigned_t) override { return true; }
    bool number_float(number_float_t, const string_t&) override { return true; }
    bool string(string_t&) override { return true; }
    bool binary(binary_t&) override { return true; }
    bool start_object(std::size_t) override { return ++depth, true; }
    bool end_object() override { return --depth, true; }
    bool start_array(std::size_t) override { return ++depth, true; }
    bool end_array() override { return --depth, true; }
    bool key(string_t& k) override {
      if (depth == 1 && duplicate.empty() && !seen.insert(k).second) duplicate = k;
      return true;
    }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
      throw ex;  // as json::parse reports it
    }
  } keys;
  json::sax_parse(text.begin(), text.end(), &keys);
  return keys.duplicate;
}

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
  testing::change_after_checks(path, file->data_start_, 0);
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

  // Parse, rejecting duplicate top-level names (nlohmann would keep the last silently). Two
  // linear passes: nlohmann's callback parser costs time quadratic in the number of keys (seconds
  // for a 20 000-tensor header), so the duplicate check is its own SAX pass that keeps only names.
  std::string duplicate;
  json header;
  try {
    duplicate = first_duplicate_key(header_text);
    if (duplicate.empty()) header = json::parse(header_text.begin(), header_text.end());
  } catch (const json::exception& e) {
    bad(origin, cat("header is not valid JSON (", e.what(), ")"));
  }
  if (!duplicate.empty()) bad(origin, cat("tensor '", duplicate, "' is defined twice in the header"));
  if (!header.is_object()) bad(origin, "header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) bad(origin, "__metadata__ must be an object of strings");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) bad(origin, cat("__metadata__ key '", m.key(), "' must be a string"));
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    auto where = [&] { return cat("tensor '", name, "': "); };
    if (name.empty()) bad(origin, "a tensor has an empty name");
    if (!entry.is_object()) bad(origin, where() + "entry must be an object");
    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) bad(origin, where() + "missing string 'dtype'");
    auto dtype = parse_dtype(dtype_it->get<std::string>());
    if (!dtype) bad(origin, where() + cat("unknown dtype '", dtype_it->get<std::string>(), "'"));

    TensorInfo info;
    info.name = name;
    info.dtype = *dtype;
    auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) bad(origin, where() + "missing array 'shape'");
    uint64_t numel = 1;
    for (const json& d : *shape_it) {
      if (!d.is_number_integer()) bad(origin, where() + "shape entries must be integers");
      if (d.is_number_unsigned() ? d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX) : d.get<int64_t>() < 0)
        bad(origin, where() + cat("shape has a negative or out-of-range dimension ", d.dump()));
      const auto dim = d.get<int64_t>();
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dim), &numel))
        bad(origin, where() + "shape's element count overflows");
      info.shape.push_back(dim);
    }
    info.numel = numel;
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(*dtype)), &bytes) || numel > (1ull << 62))
      bad(origin, where() + "shape's byte size overflows");

    auto off_it = entry.find("data_offsets");
    if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 || !(*off_it)[0].is_number_unsigned() ||
        !(*off_it)[1].is_number_unsigned())
      bad(origin, where() + "'data_offsets' must be two non-negative integers");
    info.begin = (*off_it)[0].get<uint64_t>();
    info.end = (*off_it)[1].get<uint64_t>();
    if (info.end < info.begin)
      bad(origin, where() + cat("data_offsets [", info.begin, ", ", info.end, "] are reversed"));
    if (info.end - info.begin != bytes)
      bad(origin, where() + cat("data_offsets span ", info.end - info.begin, " bytes but ", dtype_name(*dtype), " ",
                                "shape holds ", bytes, " bytes"));
    if (info.end > data_len)
      bad(origin, where() + cat("data ends at byte ", info.end, " but the data section holds only ", data_len,
                                " bytes (file truncated?)"));
    tensors_.push_back(std::move(info));
  }

  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : tensors_) {
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
  for (size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
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
  testing::change_after_checks(path_, data_start_, checks_.fetch_add(1) + 1);
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
