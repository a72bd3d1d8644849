// libFuzzer target: model.safetensors.index.json text through parse_index.
// Accepted maps name only relative files inside the checkpoint directory;
// everything else is a one-line Input error naming the index.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "formats/checkpoint_files.h"
#include "loadkit/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto map = loadkit::safetensors::parse_index(std::string_view(reinterpret_cast<const char*>(data), size),
                                                 "fuzz.index.json");
    for (const auto& [tensor, file] : map) {
      if (file.empty() || file[0] == '/') std::abort();
      if (file == ".." || file.rfind("../", 0) == 0 || file.find("/../") != std::string::npos ||
          (file.size() >= 3 && file.compare(file.size() - 3, 3, "/..") == 0))
        std::abort();
    }
  } catch (const loadkit::Error& e) {
    if (e.kind() != loadkit::ErrorKind::Input) std::abort();
    if (std::strchr(e.what(), '\n') || std::strncmp(e.what(), "fuzz.index.json: ", 17) != 0) std::abort();
  }
  return 0;
}
