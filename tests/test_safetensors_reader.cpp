// The safetensors reader and checkpoint index validation (torch-free).
// Files are built byte by byte here, never with loadkit's writer.

#include <gtest/gtest.h>

#include "formats/checkpoint_files.h"
#include "formats/header_cache.h"
#include "formats/safetensors_file.h"
#include "loadkit/error.h"
#include "test_support.h"

namespace loadkit::test {
namespace {

using safetensors::SafetensorsFile;
using json = nlohmann::ordered_json;

/// Two tensors: "a" F32 [2, 3] at [0, 24), "b" I64 [2] at [24, 40).
json good_header() {
  return json{{"a", {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}},
              {"b", {{"dtype", "I64"}, {"shape", {2}}, {"data_offsets", {24, 40}}}}};
}
std::string good_data() { return std::string(40, '\x01'); }

class ReaderTest : public ::testing::Test {
 protected:
  fs::path write(const std::string& bytes) {
    fs::path p = tmp_ / "model.safetensors";
    write_bytes(p, bytes);
    return p;
  }
  fs::path write(const json& header, const std::string& data) { return write(safetensors_bytes(header.dump(), data)); }

  /// Opening must fail with an Input error whose message contains every fragment.
  void expect_rejected(const fs::path& path, std::initializer_list<std::string> fragments) {
    try {
      SafetensorsFile::open(path.string());
      FAIL() << "accepted " << path;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Input);
      std::string msg = e.what();
      EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
      for (const auto& f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "'" << f << "' not in: " << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
  TempDir tmp_;
};

TEST_F(ReaderTest, ValidFileListsTensorsInDataOrder) {
  json h = good_header();
  h["__metadata__"] = {{"format", "pt"}};
  auto file = SafetensorsFile::open(write(h, good_data()).string());
  ASSERT_EQ(file->tensors().size(), 2u);
  EXPECT_EQ(file->tensors()[0].name, "a");
  EXPECT_EQ(file->tensors()[0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(file->tensors()[1].dtype, safetensors::DType::I64);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  EXPECT_EQ(file->file_offset(*file->find("b")) - file->file_offset(*file->find("a")), 24u);
  // Read through the validated descriptor: the bytes written after the header.
  const auto& b = *file->find("b");
  std::string got(b.bytes(), '\0');
  file->read(b, got.data());
  EXPECT_EQ(got, good_data().substr(24));
}

TEST_F(ReaderTest, ZeroByteFileFails) { expect_rejected(write(""), {"empty file"}); }

TEST_F(ReaderTest, HeaderLengthZeroFails) { expect_rejected(write(std::string(8, '\0') + "{}"), {"header length is 0"}); }

TEST_F(ReaderTest, HeaderLengthBeyondFileFails) {
  std::string bytes = safetensors_bytes(good_header().dump(), good_data());
  bytes[0] = '\xff';
  bytes[1] = '\xff';
  expect_rejected(write(bytes), {"header length", "past the end"});
}

TEST_F(ReaderTest, HeaderNotJsonFails) { expect_rejected(write(safetensors_bytes("{not json", "")), {"not valid JSON"}); }

TEST_F(ReaderTest, DuplicateTensorNameFails) {
  std::string header = R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})";
  expect_rejected(write(safetensors_bytes(header, std::string(8, '\0'))), {"'a'", "defined twice"});
}

TEST_F(ReaderTest, MetadataOfWrongTypeFails) {
  json h = good_header();
  h["__metadata__"] = json::array({1, 2});
  expect_rejected(write(h, good_data()), {"__metadata__"});
}

TEST_F(ReaderTest, UnknownDtypeFails) {
  json h = good_header();
  h["a"]["dtype"] = "F7";
  expect_rejected(write(h, good_data()), {"'a'", "unknown dtype 'F7'"});
}

TEST_F(ReaderTest, NegativeDimensionFails) {
  json h = good_header();
  h["a"]["shape"] = {-2, 3};
  expect_rejected(write(h, good_data()), {"'a'", "negative"});
}

TEST_F(ReaderTest, HugeShapeOverflowFailsWithoutAllocating) {
  json h = good_header();
  h["a"]["shape"] = {uint64_t{1} << 40, uint64_t{1} << 40};
  expect_rejected(write(h, good_data()), {"'a'", "overflow"});
}

TEST_F(ReaderTest, HundredGigabyteTensorInTinyFileFailsFast) {
  json h = good_header();
  h["a"]["shape"] = {25000000000LL};  // 100 GB of F32
  h["a"]["data_offsets"] = {0, 100000000000LL};
  h["b"]["data_offsets"] = {100000000000LL, 100000000016LL};
  expect_rejected(write(h, good_data()), {"'a'", "data section holds only 40 bytes"});
}

TEST_F(ReaderTest, ReversedOffsetsFail) {
  json h = good_header();
  h["a"]["data_offsets"] = {24, 0};
  expect_rejected(write(h, good_data()), {"'a'", "reversed"});
}

TEST_F(ReaderTest, BytesNotMatchingShapeFail) {
  json h = good_header();
  h["a"]["shape"] = {2, 2};
  expect_rejected(write(h, good_data()), {"'a'", "span 24 bytes", "16 bytes"});
}

TEST_F(ReaderTest, OverlappingOffsetsFail) {
  json h = good_header();
  h["a"]["shape"] = {4};
  h["a"]["data_offsets"] = {0, 16};
  h["b"]["data_offsets"] = {8, 24};
  expect_rejected(write(h, good_data().substr(0, 24)), {"overlap"});
}

TEST_F(ReaderTest, OffsetsOutsideDataSectionFail) {
  json h = good_header();
  h["b"]["data_offsets"] = {32, 48};
  expect_rejected(write(h, good_data()), {"'b'", "data section holds only 40 bytes"});
}

TEST_F(ReaderTest, GapBetweenTensorsFails) {
  json h = good_header();
  h["b"]["data_offsets"] = {32, 48};
  expect_rejected(write(h, std::string(48, '\0')), {"'b'", "gap"});
}

TEST_F(ReaderTest, TruncatedMidTensorFails) {
  expect_rejected(write(good_header(), good_data().substr(0, 30)), {"'b'", "truncated"});
}

TEST_F(ReaderTest, TrailingBytesFail) {
  expect_rejected(write(good_header(), good_data() + "xx"), {"cover 40 bytes", "42 bytes"});
}

TEST_F(ReaderTest, ControlCharactersInANameStayOnOneLine) {
  // Found by fuzz_safetensors_header: an escaped newline in a tensor name split the error in two.
  std::string header = R"({"a\nb":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}})";
  expect_rejected(write(safetensors_bytes(header, std::string(4, '\0'))), {"tensor 'a\\x0ab'", "unknown dtype 'F7'"});
}

// The header's contract (formats/safetensors_header.h): what one pass over the JSON must still see.

TEST_F(ReaderTest, TheFirstBadEntryInTheHeaderIsNamed) {
  json h = good_header();
  h["a"]["dtype"] = "F7";
  h["b"]["shape"] = {-2};
  expect_rejected(write(h, good_data()), {"tensor 'a'", "unknown dtype 'F7'"});
  json reversed{{"b", h["b"]}, {"a", h["a"]}};
  expect_rejected(write(reversed, good_data()), {"tensor 'b'", "negative or out-of-range dimension -2"});
}

TEST_F(ReaderTest, TextThatIsNotJsonIsNamedSoWhateverElseIsWrong) {
  json h = good_header();
  h["a"]["dtype"] = "F7";
  std::string text = h.dump();
  text.back() = ',';  // the object never closes
  expect_rejected(write(safetensors_bytes(text, good_data())), {"header is not valid JSON"});
}

TEST_F(ReaderTest, AFieldGivenTwiceCountsAsItsLastValue) {
  // As a JSON document keeps it: the last "dtype" and "shape" are the ones read.
  std::string header = R"({"a":{"dtype":"F7","shape":[9],"dtype":"F32","data_offsets":[0,8],"shape":[2]}})";
  auto file = SafetensorsFile::open(write(safetensors_bytes(header, std::string(8, '\0'))).string());
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].dtype, safetensors::DType::F32);
  EXPECT_EQ(file->tensors()[0].shape, (std::vector<int64_t>{2}));
  header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"dtype":5}})";
  expect_rejected(write(safetensors_bytes(header, std::string(8, '\0'))), {"tensor 'a'", "missing string 'dtype'"});
}

TEST_F(ReaderTest, OtherFieldsAreSkippedWhateverTheyHold) {
  std::string header =
      R"({"x":{"extra":{"dtype":"F7","shape":[-1]},"dtype":"I32","more":[[1,{"data_offsets":[9]}]],"shape":[1],)"
      R"("data_offsets":[0,4]},"__metadata__":{"format":"pt"}})";
  auto file = SafetensorsFile::open(write(safetensors_bytes(header, std::string(4, '\0'))).string());
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].dtype, safetensors::DType::I32);
  EXPECT_EQ(file->tensors()[0].shape, (std::vector<int64_t>{1}));
  EXPECT_EQ(file->metadata().at("format"), "pt");
  // Nested a hundred thousand levels deep: skipped whatever its depth.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  header = R"({"x":{"extra":)" + deep + R"(,"dtype":"I32","shape":[1],"data_offsets":[0,4]}})";
  file = SafetensorsFile::open(write(safetensors_bytes(header, std::string(4, '\0'))).string());
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].shape, (std::vector<int64_t>{1}));
}

TEST_F(ReaderTest, EveryMalformedFieldIsNamed) {
  const std::string data(4, '\0');
  auto entry = [](const std::string& fields) { return "{\"t\":{" + fields + "}}"; };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"t":5})", "tensor 't': entry must be an object"},
      {R"({"t":[1]})", "tensor 't': entry must be an object"},
      {R"({"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "a tensor has an empty name"},
      {entry(R"("shape":[1],"data_offsets":[0,4])"), "tensor 't': missing string 'dtype'"},
      {entry(R"("dtype":["F32"],"shape":[1],"data_offsets":[0,4])"), "tensor 't': missing string 'dtype'"},
      {entry(R"("dtype":"F32","shape":{"0":1},"data_offsets":[0,4])"), "tensor 't': missing array 'shape'"},
      {entry(R"("dtype":"F32","shape":[1.0],"data_offsets":[0,4])"), "shape entries must be integers"},
      {entry(R"("dtype":"F32","shape":[[1]],"data_offsets":[0,4])"), "shape entries must be integers"},
      {entry(R"("dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4])"),
       "negative or out-of-range dimension 9223372036854775808"},
      {entry(R"("dtype":"F32","shape":[1],"data_offsets":[0,4,4])"), "'data_offsets' must be two non-negative integers"},
      {entry(R"("dtype":"F32","shape":[1],"data_offsets":[-0,4])"), "'data_offsets' must be two non-negative integers"},
      {entry(R"("dtype":"F32","shape":[1],"data_offsets":"0,4")"), "'data_offsets' must be two non-negative integers"},
      {entry(R"("dtype":"F32","shape":[1])"), "'data_offsets' must be two non-negative integers"},
      {R"([{"t":{}}])", "header is not a JSON object"},
      {R"({"__metadata__":{"format":{"pt":1}}})", "__metadata__ key 'format' must be a string"},
      {R"({"__metadata__":"pt"})", "__metadata__ must be an object of strings"},
      {R"({"__metadata__":{},"__metadata__":{}})", "tensor '__metadata__' is defined twice in the header"},
  };
  for (const auto& [header, fragment] : cases) {
    SCOPED_TRACE(header);
    expect_rejected(write(safetensors_bytes(header, data)), {fragment});
  }
}

TEST_F(ReaderTest, EmptyTensorsAtOneOffsetAreInNameOrder) {
  std::string header = R"({"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},)"
                       R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                       R"("m":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}})";
  auto file = SafetensorsFile::open(write(safetensors_bytes(header, std::string(4, '\0'))).string());
  std::vector<std::string> order;
  for (const auto& t : file->tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"m", "z", "a"}));
}

// ---------------------------------------------------------------- index

class IndexTest : public ReaderTest {
 protected:
  void write_file(const std::string& name, const json& header, const std::string& data) {
    write_bytes(tmp_ / name, safetensors_bytes(header.dump(), data));
  }
  void write_index(const json& weight_map) {
    write_bytes(tmp_ / "model.safetensors.index.json", json{{"metadata", json::object()}, {"weight_map", weight_map}}.dump());
  }
  void two_shards() {
    write_file("s1.safetensors", json{{"x", {{"dtype", "U8"}, {"shape", {2}}, {"data_offsets", {0, 2}}}}}, "ab");
    write_file("s2.safetensors", json{{"y", {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {0, 1}}}}}, "c");
  }
  void expect_checkpoint_rejected(std::initializer_list<std::string> fragments) {
    try {
      safetensors::open_checkpoint(tmp_.path().string());
      FAIL() << "accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Input);
      for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  }
};

TEST_F(IndexTest, IndexedShardsOpenInNameOrder) {
  two_shards();
  write_index({{"x", "s1.safetensors"}, {"y", "s2.safetensors"}});
  auto ck = safetensors::open_checkpoint(tmp_.path().string());
  ASSERT_EQ(ck.files.size(), 2u);
  EXPECT_EQ(ck.total_tensors, 2u);
  EXPECT_EQ(ck.total_bytes, 3u);
}

TEST_F(IndexTest, IndexNamingMissingFileFails) {
  two_shards();
  write_index({{"x", "s1.safetensors"}, {"y", "s9.safetensors"}});
  expect_checkpoint_rejected({"model.safetensors.index.json", "missing file 's9.safetensors'", "'y'"});
}

TEST_F(IndexTest, IndexNamingTensorNotInFileFails) {
  two_shards();
  write_index({{"x", "s1.safetensors"}, {"y", "s1.safetensors"}});
  expect_checkpoint_rejected({"tensor 'y'", "s1.safetensors", "does not contain it"});
}

TEST_F(IndexTest, TwoShardsDefiningOneTensorFail) {
  two_shards();
  write_file("s3.safetensors", json{{"x", {{"dtype", "U8"}, {"shape", {1}}, {"data_offsets", {0, 1}}}}}, "d");
  expect_checkpoint_rejected({"tensor 'x'", "s1.safetensors", "s3.safetensors"});
}

TEST_F(IndexTest, IndexEscapingTheDirectoryFails) {
  two_shards();
  write_index({{"x", "../s1.safetensors"}});
  expect_checkpoint_rejected({"not a file inside the checkpoint directory"});
}

TEST_F(IndexTest, DirectoryWithoutSafetensorsFails) { expect_checkpoint_rejected({"no *.safetensors files"}); }

TEST_F(IndexTest, MissingDirectoryFails) {
  try {
    safetensors::open_checkpoint((tmp_ / "nope").string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Input);
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos);
  }
}

// A header validated before is not parsed again (formats/header_cache.h): the same text against
// the same data length gives the tensors the test wrote, and the file's own bytes are read; any
// other length or text is validated as ever.

/// `n` F32 tensors "t0".."t{n-1}" of shape [2, 3] in a row, with `tag` in the metadata.
json header_of(int n, const std::string& tag) {
  json h;
  h["__metadata__"] = {{"tag", tag}};
  for (int i = 0; i < n; ++i)
    h["t" + std::to_string(i)] = {{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {24 * i, 24 * (i + 1)}}};
  return h;
}

TEST_F(ReaderTest, AHeaderSeenAgainIsNotParsedAgainYetItsFileIsItsOwn) {
  const json h = header_of(40, "seen again");
  const fs::path first = tmp_ / "first.safetensors", second = tmp_ / "second.safetensors";
  write_bytes(first, safetensors_bytes(h.dump(), std::string(40 * 24, '\x01')));
  write_bytes(second, safetensors_bytes(h.dump(), std::string(40 * 24, '\x02')));
  SafetensorsFile::open(first.string());
  const uint64_t hits = safetensors::validated_header_hits();
  auto file = SafetensorsFile::open(second.string());
  EXPECT_EQ(safetensors::validated_header_hits(), hits + 1);
  ASSERT_EQ(file->tensors().size(), 40u);
  for (int i = 0; i < 40; ++i) {  // as header_of() wrote them
    const safetensors::TensorInfo* t = file->find("t" + std::to_string(i));
    ASSERT_NE(t, nullptr) << i;
    EXPECT_EQ(t->dtype, safetensors::DType::F32);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
    EXPECT_EQ(t->begin, static_cast<uint64_t>(24 * i));
    EXPECT_EQ(&file->tensors()[static_cast<size_t>(i)], file->find(file->tensors()[static_cast<size_t>(i)].name));
  }
  EXPECT_EQ(file->metadata().at("tag"), "seen again");
  EXPECT_EQ(file->path(), second.string());
  std::string bytes(24, '\0');
  file->read(*file->find("t7"), bytes.data());
  EXPECT_EQ(bytes, std::string(24, '\x02'));  // the second file's data, not the first's
}

TEST_F(ReaderTest, AHeaderSeenAgainOverAnotherDataLengthIsValidatedAgain) {
  const json h = header_of(30, "other lengths");
  write_bytes(tmp_ / "good.safetensors", safetensors_bytes(h.dump(), std::string(30 * 24, '\x01')));
  SafetensorsFile::open((tmp_ / "good.safetensors").string());
  const uint64_t hits = safetensors::validated_header_hits();
  expect_rejected(write(safetensors_bytes(h.dump(), std::string(30 * 24 + 8, '\x01'))),
                  {"tensors cover 720 bytes but the data section holds 728 bytes"});
  expect_rejected(write(safetensors_bytes(h.dump(), std::string(30 * 24 - 8, '\x01'))),
                  {"tensor 't29'", "data ends at byte 720 but the data section holds only 712 bytes"});
  EXPECT_EQ(safetensors::validated_header_hits(), hits);
}

TEST_F(ReaderTest, AHeaderOneByteAwayIsParsedAgain) {
  json h = header_of(20, "one byte");
  SafetensorsFile::open(write(h, std::string(20 * 24, '\x01')).string());
  h["t3"]["shape"] = {3, 2};  // the same length of text, another shape
  const uint64_t hits = safetensors::validated_header_hits();
  auto file = SafetensorsFile::open(write(h, std::string(20 * 24, '\x01')).string());
  EXPECT_EQ(safetensors::validated_header_hits(), hits);
  EXPECT_EQ(file->find("t3")->shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(file->find("t4")->shape, (std::vector<int64_t>{2, 3}));
}

TEST_F(ReaderTest, HeadersKeptStayBounded) {
  for (size_t i = 0; i < safetensors::kEntries + 10; ++i)
    SafetensorsFile::open(write(header_of(2, "bounded " + std::to_string(i)), std::string(48, '\x01')).string());
  EXPECT_LE(safetensors::validated_headers_kept(), safetensors::kEntries);
  EXPECT_GE(safetensors::validated_headers_kept(), safetensors::kEntries / 2);  // kept, not dropped at once
}

}  // namespace
}  // namespace loadkit::test
