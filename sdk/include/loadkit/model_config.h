#pragma once
/// \file
/// Typed, error-reporting access to a model's `config.json` (torch-free).
///
/// Every accessor that fails names the file and the key
/// (`/m/config.json: key 'rope_scaling.factor' must be a number, got string`)
/// and throws `loadkit::Error` of kind Input: a checkpoint's config is input.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace loadkit {

class ModelConfig {
 public:
  /// Reads and parses `path`; a missing file or invalid JSON is an Input error naming it.
  static ModelConfig from_file(const std::string& path);
  /// Parses `text`; `origin` names it in messages (usually the file path).
  static ModelConfig parse(std::string_view text, const std::string& origin);

  ModelConfig();  ///< empty object
  ~ModelConfig();
  ModelConfig(const ModelConfig&);
  ModelConfig& operator=(const ModelConfig&);

  /// True when `key` is present and not null.
  bool has(std::string_view key) const;
  bool is_object(std::string_view key) const;

  int64_t get_int(std::string_view key) const;
  int64_t get_int(std::string_view key, int64_t fallback) const;
  double get_double(std::string_view key) const;
  double get_double(std::string_view key, double fallback) const;
  bool get_bool(std::string_view key, bool fallback) const;
  std::string get_string(std::string_view key) const;
  std::string get_string(std::string_view key, const std::string& fallback) const;
  std::vector<std::string> get_strings(std::string_view key) const;
  std::vector<int64_t> get_ints(std::string_view key) const;
  std::vector<double> get_doubles(std::string_view key) const;
  /// The keys of this object, sorted (e.g. a quantization config's named groups).
  std::vector<std::string> keys() const;
  /// A nested object (e.g. `rope_scaling`); its errors name `parent.key`.
  ModelConfig get_object(std::string_view key) const;

  /// `key` as messages name it: dotted from the top of the file (`rope_scaling.factor`).
  std::string qualified(std::string_view key) const;
  /// File (or other origin) this config came from.
  const std::string& origin() const;
  /// Compact JSON text of this object.
  std::string dump() const;

  struct Impl;  ///< opaque

 private:
  std::shared_ptr<const Impl> impl_;
  explicit ModelConfig(std::shared_ptr<const Impl> impl);
};

}  // namespace loadkit
