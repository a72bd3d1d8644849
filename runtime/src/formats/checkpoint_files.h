#pragma once
/// \file
/// The safetensors files of a Hugging Face checkpoint directory (torch-free).
///
/// With `model.safetensors.index.json` the files are those its `weight_map`
/// names; each must exist, and each tensor the index maps to a file must be in
/// that file. Without an index, `model.safetensors` alone where it exists (as
/// transformers reads it; the other `*.safetensors` next to it are listed in
/// `ignored_files`), else every `*.safetensors` of the directory.
/// Either way every file's header is validated up front, and a tensor defined
/// in two files is an error naming both.

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "formats/safetensors_file.h"

namespace loadkit::safetensors {

struct CheckpointFiles {
  std::string directory;
  std::string index_path;  ///< empty without an index
  std::vector<std::shared_ptr<const SafetensorsFile>> files;  ///< in name order
  uint64_t total_bytes = 0;  ///< bytes of tensor data over all files
  size_t total_tensors = 0;
  /// `*.safetensors` files of the directory not read because `model.safetensors` was (name order).
  std::vector<std::string> ignored_files;
};

/// The file read alone, without an index, when it exists.
constexpr const char* kSingleFileName = "model.safetensors";

/// One line for the log when `ignored_files` is not empty: which file was read and which were not.
std::string ignored_files_note(const CheckpointFiles& files);

/// Parses an index file's text: tensor name → file name. `origin` names it in errors.
std::map<std::string, std::string> parse_index(std::string_view text, const std::string& origin);

/// Bytes of the checkpoint's largest tensor (0 without tensors).
uint64_t largest_tensor_bytes(const CheckpointFiles& files);

/// Opens and validates every file of the checkpoint in `directory`.
CheckpointFiles open_checkpoint(const std::string& directory);

}  // namespace loadkit::safetensors
