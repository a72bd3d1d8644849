// loadkit::Error's out-of-line members: the one vtable and typeinfo every
// library refers to (see error.h), and the one-line, bounded rendering of messages.

#include "loadkit/error.h"

#include <algorithm>

namespace loadkit {

namespace {

constexpr char kHex[] = "0123456789abcdef";

/// Appends `c` as printable(): itself, or `\xNN` for a control character.
void append_printable(std::string& out, unsigned char c) {
  if (c >= 0x20 && c != 0x7f) {
    out += static_cast<char>(c);
  } else {
    out += {'\\', 'x', kHex[c >> 4], kHex[c & 15]};
  }
}

size_t printable_width(unsigned char c) { return c >= 0x20 && c != 0x7f ? 1 : 4; }

/// printable(message), cut to at most Error::kMaxMessageBytes (never inside a
/// UTF-8 character) and then told how much is missing.
std::string bounded(std::string_view message) {
  std::string out;
  out.reserve(std::min(message.size(), Error::kMaxMessageBytes) + 32);
  size_t i = 0;
  for (; i < message.size(); ++i) {
    const auto c = static_cast<unsigned char>(message[i]);
    if (out.size() + printable_width(c) > Error::kMaxMessageBytes) break;
    append_printable(out, c);
  }
  if (i == message.size()) return out;
  // Bytes from 0x80 up are kept as they are, one output byte each: step back over the
  // continuation bytes (and the lead byte) of a character the cut went through.
  while (i > 0 && (static_cast<unsigned char>(message[i]) & 0xC0) == 0x80) {
    --i;
    out.pop_back();
  }
  out += "\u2026 (" + std::to_string(message.size() - i) + " bytes more)";
  return out;
}

}  // namespace

std::string printable(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (unsigned char c : text) append_printable(out, c);
  return out;
}

Error::Error(ErrorKind kind, const std::string& message) : std::runtime_error(bounded(message)), kind_(kind) {}

Error::~Error() = default;

}  // namespace loadkit
