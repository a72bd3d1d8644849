#pragma once
/// \file
/// Whether a plugin file is a complete shared library for this machine,
/// checked with plain reads before `dlopen` sees it.
///
/// Why: `dlopen` maps every loadable segment of the file and the loader then
/// touches those pages. A plugin still being copied into a plugin directory
/// (hot-drop while `cp` runs) is shorter than its own headers say, and a page
/// mapped past the end of a file is SIGBUS on first touch: every command,
/// `plugins list` included, would die, because the registry opens every
/// plugin up front. So the registry reads the ELF header, the program headers
/// and the section header table's extent itself, and a file whose headers or
/// loadable segments reach past its end is listed as broken instead.
///
/// What this cannot catch: a file truncated between this check and `dlopen`
/// (a copy over an existing plugin truncates it in place), or one whose bytes
/// are present but wrong. Plugins are trusted code; install them by copying
/// to another name and renaming (README, "Installing the SDK").

#include <cstdint>
#include <optional>
#include <string>

namespace loadkit {

struct ElfProblem {
  /// False for a file that is no ELF file at all (dlopen refuses those safely:
  /// it reads the header before mapping anything); true when it is one, but
  /// incomplete, of another machine or corrupt.
  bool is_elf = true;
  /// What is wrong, e.g. "incomplete ELF file: segment 2 (PT_LOAD) ends at
  /// byte 81920, the file has 40960 bytes (still being copied?)".
  std::string what;
};

/// Nothing when the `size`-byte regular file open at `fd` is an ELF shared
/// library of this machine (class, byte order, machine) whose ELF header,
/// program headers, section headers and every PT_LOAD segment lie within the
/// file; otherwise what is wrong. An empty file, or one holding the start of
/// the ELF magic only, is incomplete (a copy that has just begun).
std::optional<ElfProblem> elf_problem(int fd, uint64_t size);

}  // namespace loadkit
