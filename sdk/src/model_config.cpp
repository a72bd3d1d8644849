#include "loadkit/model_config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "loadkit/error.h"

namespace loadkit {

using nlohmann::json;

struct ModelConfig::Impl {
  json value = json::object();
  std::string origin;
  std::string path;  // dotted key path of this object inside the file, "" at the top
};

namespace {

std::string qualified_key(const ModelConfig::Impl& impl, std::string_view key) {
  return impl.path.empty() ? std::string(key) : cat(impl.path, ".", key);
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "boolean";
    case json::value_t::string: return "string";
    case json::value_t::array: return "array";
    case json::value_t::object: return "object";
    case json::value_t::number_float: return "number";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "integer";
    default: return "value";
  }
}

const json* find(const ModelConfig::Impl& impl, std::string_view key) {
  auto it = impl.value.find(key);
  if (it == impl.value.end() || it->is_null()) return nullptr;
  return &*it;
}

const json& require(const ModelConfig::Impl& impl, std::string_view key) {
  const json* v = find(impl, key);
  if (!v) fail(ErrorKind::Input, impl.origin, ": missing required key '", qualified_key(impl, key), "'");
  return *v;
}

[[noreturn]] void wrong_type(const ModelConfig::Impl& impl, std::string_view key, const char* want,
                             const json& got) {
  fail(ErrorKind::Input, impl.origin, ": key '", qualified_key(impl, key), "' must be ", want, ", got ",
       type_name(got));
}

int64_t as_int(const ModelConfig::Impl& impl, std::string_view key, const json& v) {
  if (v.is_number_integer() || v.is_number_unsigned()) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      fail(ErrorKind::Input, impl.origin, ": key '", qualified_key(impl, key), "' is out of range");
    return v.get<int64_t>();
  }
  if (v.is_number_float()) {
    double d = v.get<double>();
    // Some exporters write 4096.0; accept integral floats within range.
    if (d == static_cast<double>(static_cast<int64_t>(d)) && d > -9.0e18 && d < 9.0e18)
      return static_cast<int64_t>(d);
  }
  wrong_type(impl, key, "an integer", v);
}

double as_double(const ModelConfig::Impl& impl, std::string_view key, const json& v) {
  if (!v.is_number()) wrong_type(impl, key, "a number", v);
  return v.get<double>();
}

}  // namespace

ModelConfig::ModelConfig() : impl_(std::make_shared<Impl>()) {}
ModelConfig::ModelConfig(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
ModelConfig::~ModelConfig() = default;
ModelConfig::ModelConfig(const ModelConfig&) = default;
ModelConfig& ModelConfig::operator=(const ModelConfig&) = default;

ModelConfig ModelConfig::from_file(const std::string& path) {
  // Regular files only, as the runtime reads every input (runtime/src/formats/regular_file.h; the
  // SDK cannot link the runtime, so the same three calls are made here): opening a FIFO would wait
  // for a writer for ever and /dev/zero never ends. O_NONBLOCK makes opening a FIFO return at once.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) fail(ErrorKind::Input, path, ": cannot open model config: ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (fstat(fd, &st) != 0) fail(ErrorKind::Input, path, ": cannot open model config: ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail(ErrorKind::Input, path, ": cannot open model config: not a regular file");
  std::string text;
  char buffer[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(ErrorKind::Input, path, ": read error: ", std::strerror(errno));
    if (n == 0) break;
    text.append(buffer, static_cast<size_t>(n));
  }
  return parse(text, path);
}

ModelConfig ModelConfig::parse(std::string_view text, const std::string& origin) {
  auto impl = std::make_shared<Impl>();
  impl->origin = origin;
  try {
    impl->value = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    fail(ErrorKind::Input, origin, ": invalid JSON at byte ", e.byte);
  }
  if (!impl->value.is_object())
    fail(ErrorKind::Input, origin, ": expected a JSON object at the top, got ", type_name(impl->value));
  return ModelConfig(std::move(impl));
}

bool ModelConfig::has(std::string_view key) const { return find(*impl_, key) != nullptr; }

bool ModelConfig::is_object(std::string_view key) const {
  const json* v = find(*impl_, key);
  return v && v->is_object();
}

int64_t ModelConfig::get_int(std::string_view key) const { return as_int(*impl_, key, require(*impl_, key)); }

int64_t ModelConfig::get_int(std::string_view key, int64_t fallback) const {
  const json* v = find(*impl_, key);
  return v ? as_int(*impl_, key, *v) : fallback;
}

double ModelConfig::get_double(std::string_view key) const {
  return as_double(*impl_, key, require(*impl_, key));
}

double ModelConfig::get_double(std::string_view key, double fallback) const {
  const json* v = find(*impl_, key);
  return v ? as_double(*impl_, key, *v) : fallback;
}

bool ModelConfig::get_bool(std::string_view key, bool fallback) const {
  const json* v = find(*impl_, key);
  if (!v) return fallback;
  if (!v->is_boolean()) wrong_type(*impl_, key, "a boolean", *v);
  return v->get<bool>();
}

std::string ModelConfig::get_string(std::string_view key) const {
  const json& v = require(*impl_, key);
  if (!v.is_string()) wrong_type(*impl_, key, "a string", v);
  return v.get<std::string>();
}

std::string ModelConfig::get_string(std::string_view key, const std::string& fallback) const {
  return has(key) ? get_string(key) : fallback;
}

std::vector<std::string> ModelConfig::get_strings(std::string_view key) const {
  const json& v = require(*impl_, key);
  if (!v.is_array()) wrong_type(*impl_, key, "an array of strings", v);
  std::vector<std::string> out;
  for (const json& item : v) {
    if (!item.is_string()) wrong_type(*impl_, key, "an array of strings", item);
    out.push_back(item.get<std::string>());
  }
  return out;
}

std::vector<int64_t> ModelConfig::get_ints(std::string_view key) const {
  const json& v = require(*impl_, key);
  if (!v.is_array()) wrong_type(*impl_, key, "an array of integers", v);
  std::vector<int64_t> out;
  for (const json& item : v) out.push_back(as_int(*impl_, key, item));
  return out;
}

std::vector<double> ModelConfig::get_doubles(std::string_view key) const {
  const json& v = require(*impl_, key);
  if (!v.is_array()) wrong_type(*impl_, key, "an array of numbers", v);
  std::vector<double> out;
  for (const json& item : v) out.push_back(as_double(*impl_, key, item));
  return out;
}

ModelConfig ModelConfig::get_object(std::string_view key) const {
  const json& v = require(*impl_, key);
  if (!v.is_object()) wrong_type(*impl_, key, "an object", v);
  auto impl = std::make_shared<Impl>();
  impl->value = v;
  impl->origin = impl_->origin;
  impl->path = qualified_key(*impl_, key);
  return ModelConfig(std::move(impl));
}

const std::string& ModelConfig::origin() const { return impl_->origin; }

std::string ModelConfig::qualified(std::string_view key) const { return qualified_key(*impl_, key); }

std::string ModelConfig::dump() const { return impl_->value.dump(); }

std::vector<std::string> ModelConfig::keys() const {
  std::vector<std::string> out;
  for (auto it = impl_->value.begin(); it != impl_->value.end(); ++it) out.push_back(it.key());
  return out;
}

}  // namespace loadkit
