#include "formats/safetensors_file.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

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

/// A read-only private mapping of a whole file.
struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr) munmap(addr, size);
  }
};

[[noreturn]] void bad(const std::string& origin, const std::string& what) {
  fail(ErrorKind::Input, origin, ": ", what);
}

/// Why mapping `bytes` failed with ENOMEM: the file is fine, this process has no room for it.
/// Exit 1 (Other), as for memory, not 3: the same file maps where the limit is higher.
std::string out_of_address_space(uint64_t bytes) {
  std::string limit;
  struct rlimit as {};
  if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY)
    limit = cat(" (this process's address-space limit, RLIMIT_AS / ulimit -v, is ", as.rlim_cur >> 20, " MiB)");
  return cat("out of address space: cannot map its ", bytes >> 20, " MiB", limit);
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
  const RegularFile file(path, ErrorKind::Input);
  auto mapping = std::make_shared<Mapping>();
  mapping->size = static_cast<size_t>(file.size());
  if (mapping->size == 0) bad(path, "empty file (0 bytes), not a safetensors file");
  void* addr = mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, file.fd(), 0);
  if (addr == MAP_FAILED) {
    const int err = errno;
    if (err == ENOMEM) fail(ErrorKind::Other, path, ": ", out_of_address_space(mapping->size));
    bad(path, cat("cannot map: ", std::strerror(err)));
  }
  mapping->addr = addr;
  auto* bytes = static_cast<const uint8_t*>(addr);
  return parse(mapping, bytes, mapping->size, path);
}

std::shared_ptr<const SafetensorsFile> SafetensorsFile::parse(std::shared_ptr<const void> owner, const uint8_t* data,
                                                              size_t size, const std::string& origin) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = origin;
  file->owner_ = std::move(owner);
  file->bytes_ = data;
  file->size_ = size;
  file->validate();
  return file;
}

void SafetensorsFile::validate() {
  const std::string& origin = path_;
  if (size_ < 8) bad(origin, cat("file of ", size_, " bytes is too small for a safetensors header"));
  const uint64_t header_len = read_u64_le(bytes_);
  if (header_len == 0) bad(origin, "header length is 0");
  if (header_len > kMaxHeaderBytes) bad(origin, cat("header length ", header_len, " exceeds the 100 MiB limit"));
  if (header_len > size_ - 8)
    bad(origin, cat("header length ", header_len, " runs past the end of the file (", size_, " bytes)"));
  data_start_ = 8 + header_len;
  const uint64_t data_len = size_ - data_start_;

  // Parse, rejecting duplicate top-level names (nlohmann would keep the last silently).
  std::set<std::string> seen;
  std::string duplicate;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && duplicate.empty() &&
        !seen.insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  json header;
  const char* text = reinterpret_cast<const char*>(bytes_ + 8);
  try {
    header = json::parse(text, text + header_len, on_event);
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

void SafetensorsFile::will_need() const {
  // Only meaningful for mappings; harmless on other memory (advice is ignored).
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  uintptr_t start = reinterpret_cast<uintptr_t>(bytes_) & ~(page - 1);
  madvise(reinterpret_cast<void*>(start), size_ + (reinterpret_cast<uintptr_t>(bytes_) - start), MADV_WILLNEED);
}

}  // namespace loadkit::safetensors
