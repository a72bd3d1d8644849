#include "loadkit/config_reader.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "loadkit/error.h"

namespace loadkit {

ConfigReader::ConfigReader(ModelConfig config) : config_(std::move(config)) {}

std::string ConfigReader::quoted(std::string_view key) const { return cat("'", config_.qualified(key), "'"); }

int64_t ConfigReader::positive(std::string_view key) {
  const int64_t v = config_.get_int(key);
  if (v < 1) fail(ErrorKind::Input, origin(), ": key '", config_.qualified(key), "' must be a positive integer, got ", v);
  values_.insert_or_assign(std::string(key), Entry{v, quoted(key)});
  return v;
}

int64_t ConfigReader::positive(std::string_view key, int64_t fallback) {
  if (config_.has(key)) return positive(key);
  return define(key, fallback);
}

int64_t ConfigReader::positive_of(std::initializer_list<std::string_view> keys) {
  std::string_view found = *keys.begin();
  for (std::string_view k : keys)
    if (config_.has(k)) {
      found = k;
      break;
    }
  const int64_t v = positive(found);
  for (std::string_view k : keys) values_.insert_or_assign(std::string(k), Entry{v, quoted(found)});
  return v;
}

int64_t ConfigReader::non_negative(std::string_view key, int64_t fallback) {
  const int64_t v = config_.get_int(key, fallback);
  if (v < 0)
    fail(ErrorKind::Input, origin(), ": key '", config_.qualified(key), "' must be a non-negative integer, got ", v);
  values_.insert_or_assign(std::string(key), Entry{v, quoted(key)});
  return v;
}

double ConfigReader::positive_number(std::string_view key) {
  config_.get_double(key);  // present, and a number
  return positive_number(key, 0.0);
}

double ConfigReader::positive_number(std::string_view key, double fallback) {
  const double v = config_.get_double(key, fallback);
  if (!std::isfinite(v) || v <= 0.0)
    fail(ErrorKind::Input, origin(), ": key '", config_.qualified(key), "' must be a positive number, got ", v);
  return v;
}

int64_t ConfigReader::define(std::string_view name, int64_t value, std::string_view shown) {
  const std::string display = shown.empty() ? cat("'", name, "'") : std::string(shown);
  if (value < 1) fail(ErrorKind::Input, origin(), ": ", display, " must be a positive integer, got ", value);
  values_.insert_or_assign(std::string(name), Entry{value, display});
  return value;
}

int64_t ConfigReader::sum(std::string_view name, std::initializer_list<std::string_view> names) {
  int64_t total = 0;
  std::string shown;
  for (std::string_view n : names) {
    const Entry& e = entry(n);
    shown += cat(shown.empty() ? "" : " + ", e.shown);
    if (__builtin_add_overflow(total, e.value, &total))
      fail(ErrorKind::Input, origin(), ": ", shown, " overflows a 64-bit size");
  }
  return define(name, total, shown);
}

const ConfigReader::Entry& ConfigReader::entry(std::string_view name) const {
  auto it = values_.find(name);
  // A plugin that names a size it never read is a bug in the plugin, not in the checkpoint.
  if (it == values_.end()) fail(ErrorKind::Other, origin(), ": size '", name, "' used before it was read");
  return it->second;
}

int64_t ConfigReader::operator[](std::string_view name) const { return entry(name).value; }

void ConfigReader::divides(std::string_view divisor, std::string_view multiple) {
  const Entry& d = entry(divisor);
  const Entry& m = entry(multiple);
  if (m.value % d.value != 0)
    fail(ErrorKind::Input, origin(), ": ", m.shown, " (", m.value, ") is not a multiple of ", d.shown, " (", d.value,
         ")");
}

void ConfigReader::at_most(std::string_view key, std::string_view limit) {
  const Entry& k = entry(key);
  const Entry& l = entry(limit);
  if (k.value > l.value)
    fail(ErrorKind::Input, origin(), ": ", k.shown, " (", k.value, ") exceeds ", l.shown, " (", l.value, ")");
}

int64_t ConfigReader::quotient(std::string_view name, std::string_view dividend, std::string_view divisor) {
  divides(divisor, dividend);
  return define(name, entry(dividend).value / entry(divisor).value, cat(entry(dividend).shown, " / ", entry(divisor).shown));
}

std::string ConfigReader::names_and_values(std::initializer_list<std::string_view> names) const {
  std::string keys, values;
  for (std::string_view n : names) {
    const Entry& e = entry(n);
    keys += cat(keys.empty() ? "" : " x ", e.shown);
    values += cat(values.empty() ? "" : " x ", e.value);
  }
  return cat(keys, " (", values, ")");
}

int64_t ConfigReader::product(std::initializer_list<std::string_view> names, int64_t factor) const {
  int64_t out = factor;
  for (std::string_view n : names)
    if (__builtin_mul_overflow(out, entry(n).value, &out))
      fail(ErrorKind::Input, origin(), ": ", names_and_values(names), factor != 1 ? cat(" x ", factor) : "",
           " overflow a 64-bit size");
  return out;
}

void ConfigReader::allocatable(std::initializer_list<std::string_view> names, int64_t element_size, int64_t factor,
                               int64_t parts) const {
  long double bytes = static_cast<long double>(element_size) * static_cast<long double>(factor) /
                      static_cast<long double>(parts > 0 ? parts : 1);
  for (std::string_view n : names) bytes *= static_cast<long double>(entry(n).value);
  check_fits_in_memory(origin(), names_and_values(names), bytes);
  product(names, factor);  // the element count itself must fit int64 too (at::empty takes it)
}

uint64_t machine_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  uint64_t total = 0;
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string key;
    uint64_t kb = 0;
    if (fields >> key >> kb && (key == "MemTotal:" || key == "SwapTotal:")) total += kb * 1024;
  }
  if (total == 0) {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) total = static_cast<uint64_t>(pages) * static_cast<uint64_t>(page);
  }
  return total ? total : UINT64_MAX;
}

void check_fits_in_memory(const std::string& origin, const std::string& what, long double bytes) {
  static const uint64_t budget = machine_memory_bytes();
  if (bytes > static_cast<long double>(budget))
    fail(ErrorKind::Input, origin, ": ", what, " need ", human_bytes(bytes),
         ", more than this machine's memory and swap (", human_bytes(static_cast<long double>(budget)), ")");
}

std::string human_bytes(long double bytes) {
  static const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int unit = 0;
  while (bytes >= 1024.0L && unit < 6) {
    bytes /= 1024.0L;
    ++unit;
  }
  if (unit == 0) return cat(static_cast<uint64_t>(bytes), " bytes");
  if (bytes >= 1024.0L) return "more than 1024 EiB";
  char text[32];
  std::snprintf(text, sizeof text, "%.1Lf %s", bytes, units[unit]);
  return text;
}

}  // namespace loadkit
