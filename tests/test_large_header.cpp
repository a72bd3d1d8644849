// A safetensors header of an MoE-sized checkpoint (20 000 tensors) opens in one linear pass, and a
// duplicate name among them is reported as in a small header. The header is written as text here,
// never with loadkit's writer.

#include <gtest/gtest.h>

#include <string>

#include "formats/safetensors_file.h"
#include "loadkit/error.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

using safetensors::SafetensorsFile;

constexpr int kTensors = 20000;

/// `count` F32 [2] tensors "model.layers.<i/100>.mlp.experts.<i%100>.w", 8 bytes each, in order;
/// with `duplicate_last`, the last one repeats the name of the first.
std::string header_of(int count, bool duplicate_last) {
  auto name = [](int i) { return "model.layers." + std::to_string(i / 100) + ".mlp.experts." + std::to_string(i % 100) + ".w"; };
  std::string h = "{";
  for (int i = 0; i < count; ++i) {
    const std::string n = duplicate_last && i == count - 1 ? name(0) : name(i);
    h += (i ? "," : "") + std::string("\"") + n + "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[" +
         std::to_string(8 * i) + "," + std::to_string(8 * i + 8) + "]}";
  }
  return h + "}";
}

TEST(LargeHeader, TwentyThousandTensorsOpenWithEveryOffset) {
  TempDir tmp;
  const fs::path path = tmp / "moe.safetensors";
  write_bytes(path, safetensors_bytes(header_of(kTensors, false), std::string(8 * kTensors, '\0')));
  auto file = SafetensorsFile::open(path.string());
  ASSERT_EQ(file->tensors().size(), static_cast<size_t>(kTensors));
  for (int i : {0, 1, 12345, kTensors - 1}) {
    const auto* t = file->find("model.layers." + std::to_string(i / 100) + ".mlp.experts." + std::to_string(i % 100) + ".w");
    ASSERT_NE(t, nullptr) << i;
    EXPECT_EQ(t->begin, 8u * i);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{2}));
  }
}

TEST(LargeHeader, DuplicateNameAfterTwentyThousandIsNamedAsInASmallHeader) {
  TempDir tmp;
  const fs::path path = tmp / "moe.safetensors";
  write_bytes(path, safetensors_bytes(header_of(kTensors, true), std::string(8 * kTensors, '\0')));
  try {
    SafetensorsFile::open(path.string());
    FAIL() << "a header with a name defined twice was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("tensor 'model.layers.0.mlp.experts.0.w' is defined twice in the header"), std::string::npos) << msg;
  }
}

TEST(LargeHeader, NestedKeysRepeatedAcrossTensorsAreNoDuplicates) {
  // Every entry repeats "dtype"/"shape"/"data_offsets": only top-level names count.
  TempDir tmp;
  const fs::path path = tmp / "two.safetensors";
  write_bytes(path, safetensors_bytes(header_of(2, false), std::string(16, '\0')));
  EXPECT_EQ(SafetensorsFile::open(path.string())->tensors().size(), 2u);
}

}  // namespace
}  // namespace loadkit::test
