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
/// Each opened file changes at most once. Unset, the hook costs one getenv
/// per opened file and per tensor read.

#include <cstdint>
#include <string>

namespace loadkit::safetensors::testing {

/// Called when `checks` tensors of the file at `path` (data section from `data_start`) have been
/// read and checked; makes the change the environment asks for at this point, if any.
void change_after_checks(const std::string& path, uint64_t data_start, uint64_t checks);

}  // namespace loadkit::safetensors::testing
