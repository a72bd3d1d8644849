#pragma once
/// \file
/// Headers validated before, kept for a checkpoint written the same way again. A trainer writes
/// checkpoint after checkpoint whose headers are the same bytes (names, dtypes, shapes, offsets),
/// and a server or an RL loop reloads each: parsing such a header again was the largest host cost
/// before a reload's stream could open. nlohmann's SAX parser reads ~155 MB/s on the CI machine's
/// CPU: 1.5 ms for the 239 KB header of a 2,300-tensor block-fp8 MoE file, against microseconds
/// to compare its bytes with a header kept.
///
/// Contract:
///  1. Only a header that validated is kept, with the length of the data section it validated
///     against. A lookup finds it only for the same bytes and the same length, so what it returns
///     is what validating again would produce: validation reads nothing else (the file's name
///     appears only in errors, and a kept header had none).
///  2. Bounded: at most kEntries headers and kTextBytes of their text, the least recently used
///     let go first; a header longer than kTextBytes / 4 is never kept.
///  3. Safe from several threads at once (checkpoint_files.cpp validates files in parallel).
///     What it returns is immutable and shared by every file opened with that header.

#include <cstdint>
#include <memory>
#include <string_view>

#include "formats/safetensors_file.h"

namespace loadkit::safetensors {

constexpr size_t kEntries = 64;
constexpr size_t kTextBytes = 64u << 20;

/// The header validated from exactly `text` against a data section of `data_len` bytes, or null.
std::shared_ptr<const ValidatedHeader> find_validated(std::string_view text, uint64_t data_len);
/// Keeps `header`, validated from `text` against `data_len` bytes (contract 2 bounds what stays).
void keep_validated(std::string_view text, uint64_t data_len, std::shared_ptr<const ValidatedHeader> header);

/// For tests: lookups that found a header, and how many headers are kept now.
uint64_t validated_header_hits();
size_t validated_headers_kept();

}  // namespace loadkit::safetensors
