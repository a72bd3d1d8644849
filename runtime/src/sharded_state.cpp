#include "sharded_state.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <regex>

#include "loadkit/error.h"
#include "loadkit/module.h"
#include "tensor_io.h"

namespace loadkit {

namespace fs = std::filesystem;

namespace {

const uint8_t* first_byte(const at::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }
/// One past the last element (vLLM's `t.view(-1)[-1].data_ptr() + element_size`,
/// computed from the strides so that a transposed kernel weight works too).
const uint8_t* end_byte(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return first_byte(t) + (last + 1) * t.element_size();
}

std::string replace_all(std::string text, const std::string& what, const std::string& with) {
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + with.size()))
    text.replace(at, what.size(), with);
  return text;
}

/// `pattern` for `rank` with {part} matching any text, as vLLM's glob does.
std::regex file_regex(const std::string& pattern, int rank) {
  static const std::regex special(R"([.^$|()\[\]{}*+?\\])");
  std::string text = replace_all(pattern, "{rank}", std::to_string(rank));
  const size_t part = text.find("{part}");
  auto escape = [](const std::string& s) { return std::regex_replace(s, special, R"(\$&)"); };
  if (part == std::string::npos) return std::regex(escape(text));
  return std::regex(escape(text.substr(0, part)) + "(.*)" + escape(text.substr(part + 6)));
}

std::vector<fs::path> matching_files(const std::string& dir, int rank, const std::string& pattern) {
  std::vector<std::pair<std::string, fs::path>> found;
  std::error_code ec;
  const std::regex re = file_regex(pattern, rank);
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (!std::regex_match(name, m, re)) continue;
    // Parts in numeric order where the part is a number.
    std::string key = m.size() > 1 ? m[1].str() : "";
    if (!key.empty() && std::all_of(key.begin(), key.end(), ::isdigit)) key = std::string(20 - key.size(), '0') + key;
    found.emplace_back(key, entry.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& f : found) out.push_back(f.second);
  return out;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> sharded_state_dict(const Module& root) {
  // Every name of every parameter, as nn.Module.state_dict() lists them.
  std::vector<std::pair<std::string, at::Tensor>> all;
  for (auto& [prefix, module] : const_cast<Module&>(root).named_modules())
    for (auto& [name, param] : module->parameters())
      all.emplace_back(prefix.empty() ? name : prefix + "." + name, param->data);

  // _filter_subtensors, rule for rule.
  std::map<std::pair<std::string, const void*>, std::vector<size_t>> groups;
  for (size_t i = 0; i < all.size(); ++i) {
    const at::Tensor& t = all[i].second;
    if (t.numel() == 0) continue;
    groups[{t.device().str(), t.storage().data()}].push_back(i);
  }
  std::vector<bool> keep(all.size(), false);
  for (auto& [key, group] : groups) {
    for (size_t i : group) {
      const auto& [k, t] = all[i];
      const uint8_t *a = first_byte(t), *b = end_byte(t);
      bool dropped = false;
      for (size_t j : group) {
        const auto& [k2, t2] = all[j];
        if (!t2.is_contiguous()) continue;
        const uint8_t *a2 = first_byte(t2), *b2 = end_byte(t2);
        if (a < a2 || b2 < b) continue;
        if (a2 < a || b < b2 || !t.is_contiguous()) {
          dropped = true;  // t2 covers strictly more memory than t
          break;
        }
        if (k2 < k) {
          dropped = true;  // the same tensor: keep the smaller key
          break;
        }
      }
      keep[i] = !dropped;
    }
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < all.size(); ++i)
    if (keep[i]) out.push_back(std::move(all[i]));
  return out;
}

std::string sharded_file_name(const std::string& pattern, int rank, int part) {
  return replace_all(replace_all(pattern, "{rank}", std::to_string(rank)), "{part}", std::to_string(part));
}

std::vector<std::string> save_sharded_state(const Module& root, const std::string& dir, int rank,
                                            const std::string& pattern, std::optional<uint64_t> max_part_bytes) {
  if (pattern.find("{rank}") == std::string::npos)
    fail(ErrorKind::Usage, "sharded file pattern '", pattern, "' has no {rank}");
  if (max_part_bytes && pattern.find("{part}") == std::string::npos)
    fail(ErrorKind::Usage, "sharded file pattern '", pattern, "' has no {part}, so it cannot be split into parts");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir)) fail(ErrorKind::Input, dir, ": cannot create the output directory");
  // A part from an earlier, larger save would be read as this rank's too.
  for (const auto& old : matching_files(dir, rank, pattern)) fs::remove(old, ec);

  std::vector<std::string> written;
  std::vector<std::pair<std::string, at::Tensor>> part;
  uint64_t part_bytes = 0;
  auto flush = [&] {
    const std::string path = (fs::path(dir) / sharded_file_name(pattern, rank, static_cast<int>(written.size()))).string();
    save_tensors(path, part);
    written.push_back(path);
    part.clear();
    part_bytes = 0;
  };
  for (auto& [name, tensor] : sharded_state_dict(root)) {
    const uint64_t bytes = tensor.nbytes();
    if (max_part_bytes && !part.empty() && part_bytes + bytes > *max_part_bytes) flush();
    part.emplace_back(name, tensor);
    part_bytes += bytes;
  }
  if (!part.empty()) flush();
  return written;
}

bool has_sharded_state(const std::string& dir, int rank, const std::string& pattern) {
  return !matching_files(dir, rank, pattern).empty();
}

safetensors::CheckpointFiles open_sharded_state(const std::string& dir, int rank, const std::string& pattern) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(ErrorKind::Input, dir, ": model directory does not exist");
  const auto paths = matching_files(dir, rank, pattern);
  if (paths.empty())
    fail(ErrorKind::Input, "no sharded-state files '", (fs::path(dir) / sharded_file_name(pattern, rank, 0)).string(),
         "' (pattern '", pattern, "', rank ", rank, ") in ", dir);
  safetensors::CheckpointFiles files;
  files.directory = dir;
  for (const auto& path : paths) {
    auto file = safetensors::SafetensorsFile::open(path.string());
    for (const auto& info : file->tensors()) files.total_bytes += info.bytes();
    files.total_tensors += file->tensors().size();
    files.files.push_back(std::move(file));
  }
  return files;
}

reload::KernelCopyTargets sharded_state_targets(const Module& root) {
  reload::KernelCopyTargets targets;
  targets.tensors = sharded_state_dict(root);
  targets.what = "in the model's sharded state";
  targets.leading_part_fits = true;
  return targets;
}

void copy_model_metadata(const std::string& from, const std::string& to) {
  namespace fs = std::filesystem;
  for (const auto& entry : fs::directory_iterator(from)) {
    const std::string name = entry.path().filename().string();
    const std::string ext = entry.path().extension().string();
    if (!entry.is_regular_file() || ext == ".safetensors" || ext == ".bin" || ext == ".pt" || ext == ".pth" ||
        name.ends_with(".index.json"))
      continue;
    fs::copy_file(entry.path(), fs::path(to) / name, fs::copy_options::overwrite_existing);
  }
}

}  // namespace loadkit
