// loadkit::Error's message: one line, bounded, and cut where a reader can still
// decode it (sdk/include/loadkit/error.h); and through the CLI, a name from a
// file that is megabytes long makes a line of a few KB.

#include <gtest/gtest.h>

#include <string>

#include "loadkit/error.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

constexpr size_t kMax = Error::kMaxMessageBytes;

/// Whether `s` is well-formed UTF-8 (written here, independently of the code under test).
bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += n;
  }
  return true;
}

TEST(ErrorMessage, ShortMessageIsKeptAsIs) {
  const Error e(ErrorKind::Input, "model.safetensors: tensor 'a.b' is [2, 3]");
  EXPECT_EQ(std::string(e.what()), "model.safetensors: tensor 'a.b' is [2, 3]");
  EXPECT_EQ(e.kind(), ErrorKind::Input);
}

TEST(ErrorMessage, ControlCharactersAreEscaped) {
  EXPECT_EQ(std::string(Error(ErrorKind::Usage, "key 'a\nb\tc'").what()), "key 'a\\x0ab\\x09c'");
}

TEST(ErrorMessage, MessageOfExactlyTheLimitIsKept) {
  const std::string text(kMax, 'x');
  EXPECT_EQ(std::string(Error(ErrorKind::Input, text).what()), text);
}

TEST(ErrorMessage, LongMessageIsCutAndSaysHowMuchIsMissing) {
  const std::string text = std::string(kMax, 'a') + std::string(27'000'000, 'b');
  const std::string what = Error(ErrorKind::Input, text).what();
  const std::string suffix = "\u2026 (27000000 bytes more)";
  ASSERT_GE(what.size(), suffix.size());
  EXPECT_EQ(what.substr(0, kMax), std::string(kMax, 'a'));
  EXPECT_EQ(what.substr(kMax), suffix);
}

TEST(ErrorMessage, CutNeverSplitsAUtf8Character) {
  // "é" is two bytes: with one byte of room left, the cut goes before it, not through it.
  for (size_t pad : {kMax - 1, kMax - 2, kMax - 3}) {
    std::string text(pad, 'a');
    for (int i = 0; i < 10; ++i) text += "\u00e9\u20ac";  // 2- and 3-byte characters
    const std::string what = Error(ErrorKind::Input, text).what();
    EXPECT_TRUE(valid_utf8(what)) << pad;
    const size_t kept = what.find("\u2026 (");
    ASSERT_NE(kept, std::string::npos);
    EXPECT_LE(kept, kMax);
    const size_t more = std::stoul(what.substr(kept + 5));
    EXPECT_EQ(kept + more, text.size()) << "kept and missing bytes add up to the message";
  }
}

TEST(ErrorMessage, EscapesCountTowardsTheLimit) {
  const std::string what = Error(ErrorKind::Input, std::string(kMax, '\n')).what();
  EXPECT_LE(what.find("\u2026"), kMax);
  EXPECT_EQ(what.substr(0, 8), "\\x0a\\x0a");
  EXPECT_EQ(what.find('\n'), std::string::npos);
}

TEST(ErrorMessageCli, HugeArchitectureNameMakesAShortLine) {
  const Fixture& f = fixture("llama_fp32_gqa_sharded");
  TempDir tmp;
  const fs::path model = copy_fixture(f, tmp / "model");
  auto cfg = nlohmann::ordered_json::parse(read_bytes(model / "config.json"));
  cfg["architectures"] = {std::string(1 << 20, 'X')};
  write_bytes(model / "config.json", cfg.dump());
  const CliResult r = run_cli({"load", "--model", model.string(), "--plugin-dir", plugin_dir()});
  expect_failure(r, 4, {"no plugin serves architecture 'XXXX", "bytes more)"});
  ASSERT_EQ(r.error_lines().size(), 1u);
  EXPECT_LE(r.error_lines()[0].size(), kMax + 64);
}

}  // namespace
}  // namespace loadkit::test
