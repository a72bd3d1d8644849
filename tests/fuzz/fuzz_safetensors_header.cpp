// libFuzzer target: a whole safetensors file (length prefix, header JSON, data)
// through the reader's validation. Every input must either be accepted with
// every tensor inside the input, ordered and contiguous, or be refused with a
// one-line Input error; anything else (another exception, a sanitizer report,
// a leak, a crash) is a finding.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "formats/safetensors_file.h"
#include "loadkit/error.h"

using loadkit::safetensors::SafetensorsFile;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto file = SafetensorsFile::parse(nullptr, data, size, "fuzz.safetensors");
    uint64_t expected_end = 0;
    for (const auto& t : file->tensors()) {
      const uint8_t* begin = data + file->file_offset(t);
      if (begin < data || begin + t.bytes() > data + size) std::abort();  // outside the input
      if (t.begin != expected_end || file->find(t.name) != &t) std::abort();
      if (t.bytes() != t.numel * loadkit::safetensors::dtype_size(t.dtype)) std::abort();
      expected_end = t.end;
      if (t.bytes() > 0) {
        uint8_t ends[2];  // ASan checks both ends of what try_read copies
        if (!file->try_read(t, 0, &ends[0], 1).empty() || !file->try_read(t, t.bytes() - 1, &ends[1], 1).empty() ||
            ends[0] != begin[0] || ends[1] != begin[t.bytes() - 1])
          std::abort();
      }
    }
  } catch (const loadkit::Error& e) {
    if (e.kind() != loadkit::ErrorKind::Input) std::abort();
    if (std::strchr(e.what(), '\n') || std::strncmp(e.what(), "fuzz.safetensors: ", 18) != 0) std::abort();
  }
  return 0;
}
