#include "formats/checkpoint_files.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "formats/regular_file.h"
#include "loadkit/error.h"

namespace loadkit::safetensors {

namespace fs = std::filesystem;
using nlohmann::json;

std::map<std::string, std::string> parse_index(std::string_view text, const std::string& origin) {
  json index;
  try {
    index = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    fail(ErrorKind::Input, origin, ": not valid JSON (", e.what(), ")");
  }
  if (!index.is_object()) fail(ErrorKind::Input, origin, ": expected a JSON object");
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object())
    fail(ErrorKind::Input, origin, ": missing object 'weight_map'");
  std::map<std::string, std::string> weight_map;
  const std::string* inside = nullptr;  // the last file name found inside the directory (thousands of entries name a few files)
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    if (!it.value().is_string())
      fail(ErrorKind::Input, origin, ": weight_map entry '", it.key(), "' must be a file name string");
    const std::string& file = it.value().get_ref<const std::string&>();
    if (!inside || *inside != file) {
      const fs::path p(file);
      if (file.empty() || p.is_absolute() ||
          std::any_of(p.begin(), p.end(), [](const fs::path& part) { return part == ".."; }))
        fail(ErrorKind::Input, origin, ": weight_map entry '", it.key(), "' names '", file,
             "', which is not a file inside the checkpoint directory");
      inside = &file;
    }
    weight_map.emplace_hint(weight_map.end(), it.key(), file);  // the object's keys come sorted
  }
  return weight_map;
}

namespace {

/// Threads that validate a checkpoint's headers at once (the caller is one of them).
constexpr size_t kOpenThreads = 8;

/// Every file of `paths` opened and validated, several at once: a reload opens its checkpoint's
/// headers every time, and a block-fp8 MoE checkpoint's 2030 tensors took 11 ms to validate one
/// file after another on the GPU machine. Fails as opening them in order would: with the error of
/// the first in order that failed.
std::vector<std::shared_ptr<const SafetensorsFile>> open_files(const std::vector<std::string>& paths) {
  std::vector<std::shared_ptr<const SafetensorsFile>> files(paths.size());
  std::vector<std::exception_ptr> errors(paths.size());
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next++; i < paths.size(); i = next++) {
      try {
        files[i] = SafetensorsFile::open(paths[i]);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < std::min(paths.size(), kOpenThreads); ++t) {
    try {
      helpers.emplace_back(work);
    } catch (const std::system_error&) {
      break;  // no thread to be had: fewer do the work
    }
  }
  work();
  for (auto& h : helpers) h.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  return files;
}

}  // namespace

CheckpointFiles open_checkpoint(const std::string& directory) {
  std::error_code ec;
  if (!fs::exists(fs::status(directory, ec))) {
    if (ec && ec != std::errc::no_such_file_or_directory)
      fail(ErrorKind::Input, directory, ": cannot access model directory: ", ec.message());
    fail(ErrorKind::Input, directory, ": model directory does not exist");
  }
  if (!fs::is_directory(directory, ec)) fail(ErrorKind::Input, directory, ": not a directory");

  CheckpointFiles out;
  out.directory = directory;
  const fs::path dir(directory);
  const fs::path index_path = dir / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> names;
  if (fs::exists(index_path, ec)) {
    out.index_path = index_path.string();
    weight_map = parse_index(read_regular_file(out.index_path, ErrorKind::Input), out.index_path);
    std::set<std::string> unique;
    for (const auto& [tensor, file] : weight_map) {
      if (!unique.insert(file).second) continue;
      // A name that exists but is no regular file (a FIFO) is refused by SafetensorsFile::open, saying what it is.
      if (!fs::exists(dir / file, ec))
        fail(ErrorKind::Input, out.index_path, ": weight_map names missing file '", file, "' (for tensor '", tensor,
             "')");
    }
    names.assign(unique.begin(), unique.end());
  } else {
    fs::directory_iterator it(dir, ec);
    if (ec) fail(ErrorKind::Input, directory, ": cannot list directory: ", ec.message());
    for (const auto& entry : it)
      if (entry.path().extension() == ".safetensors") names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    if (names.empty()) fail(ErrorKind::Input, directory, ": no *.safetensors files (and no model.safetensors.index.json)");
    // transformers reads model.safetensors alone when it exists: the other files next to it are
    // adapters (adapter_model.safetensors), other layouts of the same weights
    // (consolidated.safetensors) or strays, and reading them too would define tensors twice or
    // add names the model does not have.
    if (std::find(names.begin(), names.end(), kSingleFileName) != names.end()) {
      for (auto& name : names)
        if (name != kSingleFileName) out.ignored_files.push_back(std::move(name));
      names = {kSingleFileName};
    }
  }

  std::vector<std::string> paths;
  for (const auto& name : names) paths.push_back((dir / name).string());
  auto opened = open_files(paths);
  std::unordered_map<std::string, const SafetensorsFile*> owner;
  std::map<std::string, const SafetensorsFile*, std::less<>> by_file_name;
  for (size_t i = 0; i < names.size(); ++i) {
    auto& file = opened[i];
    by_file_name.emplace(names[i], file.get());
    for (const auto& t : file->tensors()) {
      auto [it, inserted] = owner.emplace(t.name, file.get());
      if (!inserted)
        fail(ErrorKind::Input, file->path(), ": tensor '", t.name, "' is also defined in ", it->second->path());
      out.total_bytes += t.bytes();
    }
    out.total_tensors += file->tensors().size();
    out.files.push_back(std::move(file));
  }
  for (const auto& [tensor, file] : weight_map) {
    auto it = owner.find(tensor);
    if (it == owner.end() || it->second != by_file_name.at(file))  // every file the index names was opened
      fail(ErrorKind::Input, out.index_path, ": weight_map maps tensor '", tensor, "' to '", file,
           "', which does not contain it");
  }
  return out;
}

std::string ignored_files_note(const CheckpointFiles& files) {
  std::string names;
  for (const auto& name : files.ignored_files) names += cat(names.empty() ? "" : ", ", name);
  return cat(files.directory, ": read ", kSingleFileName, " alone (no model.safetensors.index.json), as transformers does; ignored ",
             names);
}

uint64_t largest_tensor_bytes(const CheckpointFiles& files) {
  uint64_t largest = 0;
  for (const auto& file : files.files)
    for (const auto& info : file->tensors()) largest = std::max(largest, info.bytes());
  return largest;
}

}  // namespace loadkit::safetensors
