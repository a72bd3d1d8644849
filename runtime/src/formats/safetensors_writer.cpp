#include "formats/safetensors_writer.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "loadkit/error.h"

namespace loadkit::safetensors {

void write_file(const std::string& path, const std::vector<TensorBlob>& tensors,
                const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    if (numel * dtype_size(t.dtype) != t.bytes)
      fail(ErrorKind::Other, path, ": tensor '", t.name, "' has ", t.bytes, " bytes, its shape needs ",
           numel * dtype_size(t.dtype));
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.bytes}}};
    offset += t.bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) fail(ErrorKind::Other, path, ": cannot write: ", std::strerror(errno));
  // The first failing call's errno is the reason (EFBIG past a file-size limit, ENOSPC, EIO);
  // fclose and remove would overwrite it.
  int err = 0;
  auto put = [&](const void* data, size_t bytes) {
    if (err != 0 || bytes == 0) return;
    errno = 0;
    if (std::fwrite(data, 1, bytes, f) != bytes) err = errno ? errno : EIO;
  };
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  put(len, 8);
  put(text.data(), text.size());
  for (const auto& t : tensors) put(t.data, t.bytes);
  errno = 0;
  if (std::fclose(f) != 0 && err == 0) err = errno ? errno : EIO;
  if (err == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    std::remove(tmp.c_str());
    fail(ErrorKind::Other, path, ": write failed: ", std::strerror(err));
  }
}

}  // namespace loadkit::safetensors
