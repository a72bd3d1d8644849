#pragma once
/// \file
/// A test-only hook: changes a checkpoint file at a chosen point of its
/// reading, so that the tests of a file changing while it is read
/// (tests/test_changing_checkpoint.cpp, tests/python/test_changing_checkpoint.py)
/// are deterministic instead of racing a writer.
///
/// Only the environment variable `LOADKIT_TEST_CHANGE_FILE` enables it, and
/// only tests set it:
///
///     LOADKIT_TEST_CHANGE_FILE=<how>:<after>:<path>
///
/// `<path>` names the file (compared after resolving both paths); `<after>` is
/// how many tensors of it are read and checked first (0: right after its
/// header is validated); `<how>` is what a writer does then:
///
///   truncate  cut the file to its header and half its data (`cp`,
///             `safetensors.save_file` over it: truncate, then write)
///   rewrite   write its data section again in place, every byte inverted
///             (same size, different bytes)
///   rename    write a copy with every data byte inverted beside it and
///             rename it over the name (the safe way to replace a file)
///
/// Each opened file changes at most once. The variable is read when a file is
/// opened: unset then, the hook costs that file one getenv and nothing per
/// tensor read (a reload checks its files after each of thousands of tensors).

#include <cstdint>
#include <string>

namespace loadkit::safetensors::testing {

/// Whether the environment asks for a change (LOADKIT_TEST_CHANGE_FILE set): read when a file is
/// opened, which then calls change_after_checks() after its reads.
bool enabled();
/// Called when `checks` tensors of the file at `path` (data section from `data_start`) have been
/// read and checked; makes the change the environment asks for at this point, if any.
void change_after_checks(const std::string& path, uint64_t data_start, uint64_t checks);

}  // namespace loadkit::safetensors::testing
