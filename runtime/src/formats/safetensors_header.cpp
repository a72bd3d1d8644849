#include "formats/safetensors_header.h"

#include <exception>
#include <nlohmann/json.hpp>
#include <unordered_set>

#include "loadkit/error.h"

namespace loadkit::safetensors {

namespace {

using nlohmann::json;

/// JSON events to entries. Every open object or array that is read is a context on a stack (at
/// most three: the top level, an entry or __metadata__, a shape or offsets array); a value's event
/// is read by the context it lands in. What lies inside a value that is skipped is only counted,
/// so a deeply nested header costs no memory per level. The first problem is kept (not thrown) so
/// that the rest of the text is still parsed: a syntax error anywhere wins (contract 1).
class HeaderReader final : public nlohmann::json_sax<json> {
 public:
  HeaderReader(const std::string& origin, std::map<std::string, std::string>& metadata,
               const std::function<void(const HeaderEntry&)>& on_entry)
      : origin_(origin), metadata_(metadata), on_entry_(on_entry) {}

  /// The problem found in a text that parsed, if any.
  void raise_first_problem() const {
    if (problem_) std::rethrow_exception(problem_);
  }

  bool null() override { return scalar(); }
  bool boolean(bool) override { return scalar(); }
  bool number_float(number_float_t, const string_t&) override { return scalar(); }
  bool binary(binary_t&) override { return scalar(); }
  bool number_integer(number_integer_t v) override { return number({HeaderEntry::Dim::Kind::Signed, 0, v}); }
  bool number_unsigned(number_unsigned_t v) override { return number({HeaderEntry::Dim::Kind::Unsigned, v, 0}); }

  bool string(string_t& s) override {
    if (in(Ctx::Entry) && field_ == Field::DType) {
      entry_.has_dtype = true;
      entry_.dtype = s;
      return true;
    }
    if (in(Ctx::Metadata)) {
      if (!problem_) metadata_[key_] = s;
      return true;
    }
    return scalar();
  }

  bool key(string_t& k) override {
    if (skipped_ > 0) return true;
    if (in(Ctx::Top)) {
      if (!names_.insert(k).second) problem("tensor '", k, "' is defined twice in the header");
      name_ = k;
    } else if (in(Ctx::Entry)) {
      field_ = k == "dtype" ? Field::DType : k == "shape" ? Field::Shape : k == "data_offsets" ? Field::Offsets : Field::Other;
    } else {
      key_ = k;
    }
    return true;
  }

  bool start_object(std::size_t) override {
    if (skipped_ > 0 || (!stack_.empty() && !in(Ctx::Top))) return skip_container();
    if (stack_.empty()) {
      stack_.push_back(Ctx::Top);
    } else if (name_ == "__metadata__") {
      stack_.push_back(Ctx::Metadata);
    } else {  // a tensor's entry
      entry_.name = name_;
      entry_.is_object = true;
      entry_.has_dtype = entry_.has_shape = entry_.has_offsets = false;
      stack_.push_back(Ctx::Entry);
    }
    return true;
  }

  bool end_object() override {
    if (leave_skipped()) return true;
    if (in(Ctx::Entry)) deliver();
    stack_.pop_back();
    return true;
  }

  bool start_array(std::size_t) override {
    if (in(Ctx::Entry) && field_ == Field::Shape) {
      entry_.has_shape = true;
      entry_.shape.clear();
      stack_.push_back(Ctx::Shape);
    } else if (in(Ctx::Entry) && field_ == Field::Offsets) {
      offsets_seen_ = 0;
      offsets_unsigned_ = true;
      stack_.push_back(Ctx::Offsets);
    } else {
      return skip_container();
    }
    return true;
  }

  bool end_array() override {
    if (leave_skipped()) return true;
    if (in(Ctx::Offsets)) entry_.has_offsets = offsets_seen_ == 2 && offsets_unsigned_;
    stack_.pop_back();
    return true;
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
    throw ex;  // as json::parse reports it
  }

 private:
  enum class Ctx { Top, Entry, Metadata, Shape, Offsets };
  enum class Field { DType, Shape, Offsets, Other };

  bool in(Ctx c) const { return skipped_ == 0 && !stack_.empty() && stack_.back() == c; }

  /// A value other than a string or an integer, read where it lands (also an object's or an
  /// array's start where only a scalar belongs).
  bool scalar() {
    if (skipped_ > 0) return true;
    if (stack_.empty()) {
      problem("header is not a JSON object");
    } else if (in(Ctx::Top)) {
      if (name_ == "__metadata__") {
        problem("__metadata__ must be an object of strings");
      } else {
        entry_.name = name_;
        entry_.is_object = false;
        deliver();
      }
    } else if (in(Ctx::Entry)) {
      if (field_ == Field::DType) entry_.has_dtype = false;
      if (field_ == Field::Shape) entry_.has_shape = false;
      if (field_ == Field::Offsets) entry_.has_offsets = false;
    } else if (in(Ctx::Metadata)) {
      problem("__metadata__ key '", key_, "' must be a string");
    } else if (in(Ctx::Shape)) {
      entry_.shape.push_back({HeaderEntry::Dim::Kind::NotInteger});
    } else if (in(Ctx::Offsets)) {
      ++offsets_seen_;
      offsets_unsigned_ = false;
    }
    return true;
  }

  /// An object or array that is not read: counted as a scalar where it lands (where a scalar is
  /// wrong, so is a container), then only its nesting is counted until it closes.
  bool skip_container() {
    scalar();
    ++skipped_;
    return true;
  }

  /// Whether the closing object or array was inside (or was) a skipped value.
  bool leave_skipped() {
    if (skipped_ == 0) return false;
    --skipped_;
    return true;
  }

  bool number(HeaderEntry::Dim dim) {
    if (in(Ctx::Shape)) {
      entry_.shape.push_back(dim);
    } else if (in(Ctx::Offsets)) {
      if (offsets_seen_ < 2) entry_.offsets[offsets_seen_] = dim.unsigned_value;
      ++offsets_seen_;
      offsets_unsigned_ = offsets_unsigned_ && dim.kind == HeaderEntry::Dim::Kind::Unsigned;
    } else {
      scalar();
    }
    return true;
  }

  void deliver() {
    if (problem_) return;
    try {
      on_entry_(entry_);
    } catch (...) {
      problem_ = std::current_exception();
    }
  }

  template <typename... Parts>
  void problem(const Parts&... parts) {
    if (problem_) return;
    try {
      fail(ErrorKind::Input, origin_, ": ", parts...);
    } catch (...) {
      problem_ = std::current_exception();
    }
  }

  const std::string& origin_;
  std::map<std::string, std::string>& metadata_;
  const std::function<void(const HeaderEntry&)>& on_entry_;
  std::vector<Ctx> stack_;
  uint64_t skipped_ = 0;  ///< open objects and arrays inside a value that is skipped
  std::unordered_set<std::string> names_;
  std::string name_, key_;  ///< the last key read at the top level, and in __metadata__
  Field field_ = Field::Other;
  HeaderEntry entry_;
  int offsets_seen_ = 0;
  bool offsets_unsigned_ = true;
  std::exception_ptr problem_;
};

}  // namespace

void read_header(std::string_view text, const std::string& origin, std::map<std::string, std::string>& metadata,
                 const std::function<void(const HeaderEntry&)>& on_entry) {
  HeaderReader reader(origin, metadata, on_entry);
  try {
    json::sax_parse(text.begin(), text.end(), &reader);
  } catch (const json::exception& e) {
    fail(ErrorKind::Input, origin, ": header is not valid JSON (", e.what(), ")");
  }
  reader.raise_first_problem();
}

}  // namespace loadkit::safetensors
