#pragma once
/// \file
/// Sizes from a model's `config.json`, validated as they are read (torch-free).
///
/// A plugin reads every size it divides by, multiplies with or allocates from
/// through a `ConfigReader`, and each call states the constraint, so the
/// checks are data next to the key rather than hand-written `if`s:
///
/// \code
///   ConfigReader r(ctx.config);
///   r.positive("hidden_size");
///   r.positive("num_attention_heads");
///   r.positive("num_key_value_heads", r["num_attention_heads"]);
///   r.divides("num_key_value_heads", "num_attention_heads");        // query heads share kv heads evenly
///   r.quotient("head_dim", "hidden_size", "num_attention_heads");    // exact, or exit 3 naming both
///   r.allocatable({"vocab_size", "hidden_size"}, element_size);      // before at::empty, not after
/// \endcode
///
/// Every failure is `loadkit::Error` of kind Input (exit 3), one line naming
/// the file and every key involved:
///
///   config.json: key 'num_attention_heads' must be a positive integer, got 0
///   config.json: 'hidden_size' (100) is not a multiple of 'num_attention_heads' (3)
///   config.json: 'vocab_size' x 'hidden_size' (1000000000000 x 96) need 349.2 TiB, more than
///     this machine's memory and swap (31.2 GiB)
///
/// Values read are remembered under their key (`r["hidden_size"]`), so later
/// constraints and products name them; a derived size (`quotient`, `define`)
/// is remembered under the name given to it.

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <string_view>

#include "loadkit/model_config.h"

namespace loadkit {

class ConfigReader {
 public:
  explicit ConfigReader(ModelConfig config);

  const ModelConfig& config() const { return config_; }
  const std::string& origin() const { return config_.origin(); }

  /// A required integer >= 1.
  int64_t positive(std::string_view key);
  /// An integer >= 1; `fallback` (not checked) when the key is absent or null.
  int64_t positive(std::string_view key, int64_t fallback);
  /// The first of `keys` present (GPT-2's `n_embd` before `hidden_size`), >= 1;
  /// remembered under every name in `keys`, messages name the one read.
  int64_t positive_of(std::initializer_list<std::string_view> keys);
  /// An integer >= 0 (0 often means "none": no sliding window, no q_lora_rank).
  int64_t non_negative(std::string_view key, int64_t fallback);
  /// A finite number > 0 (a scale or factor something is divided by).
  double positive_number(std::string_view key);
  double positive_number(std::string_view key, double fallback);

  /// Remembers a size the plugin computed itself under `name` (checked >= 1); messages
  /// name it as `shown` ("qk_nope_head_dim + v_head_dim"), by default `name`.
  int64_t define(std::string_view name, int64_t value, std::string_view shown = {});
  /// The sum of the remembered `names` (checked against overflow), remembered as `name`.
  int64_t sum(std::string_view name, std::initializer_list<std::string_view> names);
  /// The value remembered under `name` (read or defined before; a plugin bug otherwise).
  int64_t operator[](std::string_view name) const;
  bool has(std::string_view key) const { return config_.has(key); }

  /// Fails unless the size remembered as `key` is at most the one remembered as `limit`.
  void at_most(std::string_view key, std::string_view limit);
  /// Fails unless `multiple` is a multiple of `divisor` (both remembered), naming both.
  void divides(std::string_view divisor, std::string_view multiple);
  /// `dividend` / `divisor`, which must divide exactly; remembered as `name`
  /// (shown as "dividend / divisor").
  int64_t quotient(std::string_view name, std::string_view dividend, std::string_view divisor);
  /// The product of the remembered `names` times `factor`, or a failure naming
  /// them when it overflows 64 bits.
  int64_t product(std::initializer_list<std::string_view> names, int64_t factor = 1) const;
  /// Fails, naming `names`, when a tensor of `product(names) * factor` elements of
  /// `element_size` bytes, split over `parts` ranks, could never be allocated here
  /// (more than this machine's memory and swap). Call it before allocating.
  void allocatable(std::initializer_list<std::string_view> names, int64_t element_size, int64_t factor = 1,
                   int64_t parts = 1) const;

 private:
  struct Entry {
    int64_t value;
    std::string shown;  ///< as messages name it: "'n_embd'" (the alias read), "'a' + 'b'"
  };
  std::string quoted(std::string_view key) const;
  const Entry& entry(std::string_view name) const;
  std::string names_and_values(std::initializer_list<std::string_view> names) const;

  ModelConfig config_;
  std::map<std::string, Entry, std::less<>> values_;
};

/// Bytes this machine could ever give one process: MemTotal + SwapTotal
/// (UINT64_MAX when unknown). A model larger than this is absurd here on any device.
uint64_t machine_memory_bytes();

/// Fails (Input, naming `origin` and `what`) when `bytes` exceed machine_memory_bytes().
void check_fits_in_memory(const std::string& origin, const std::string& what, long double bytes);

/// "1.5 GiB", "349.2 TiB": for messages.
std::string human_bytes(long double bytes);

}  // namespace loadkit
