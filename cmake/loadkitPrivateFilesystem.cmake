# Every binary we link gets its own copy of libstdc++'s std::filesystem,
# bound at link time and kept out of its dynamic symbol table.
#
# Why: libtorch's wheels (built with a gcc-toolset whose newer parts of
# libstdc++ are linked statically) export their own, older std::filesystem
# without symbol versions, and an unversioned definition satisfies our
# versioned references (GLIBCXX_3.4.26). Whenever libtorch comes before
# libstdc++ in a lookup scope our calls go to that copy, which does not match
# the headers we compiled against (remove_all crashed on the GPU machine).
# Naming libstdc++ first among our NEEDED entries (the top-level
# CMakeLists.txt) orders our own lookup scope, but not the global scope that
# is searched before it: a process that loaded libtorch with RTLD_GLOBAL
# (TORCH_USE_RTLD_GLOBAL=1, or a host that dlopens it so) still binds us to
# libtorch's copy, and no load order chosen from Python can undo that.
#
# So the calls are not left to the dynamic linker at all: the compiler's own
# libstdc++.a members that implement std::filesystem (fs_dir.o, fs_ops.o,
# fs_path.o; the same sources as libstdc++.so, for exactly the headers we
# compile with) are linked whole into each shared library, module and
# executable, and --exclude-libs makes their symbols local. What they call in
# turn (strings, allocation, exceptions) binds to libstdc++.so as usual.
# Cost: about 120 kB of code per binary. tests/python/test_std_filesystem.py
# checks the result (no std::filesystem symbol imported by any of our
# binaries; a load, reload and plugin discovery after `import torch` with
# TORCH_USE_RTLD_GLOBAL=1).
#
# Skipped, with a status line, where the compiler has no such archive or it
# cannot go into a shared library (not built as PIC).

set(LOADKIT_PRIVATE_FILESYSTEM "" CACHE INTERNAL "the link option that links std::filesystem privately")

function(_loadkit_private_filesystem)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    message(STATUS "loadkit: std::filesystem from libstdc++.so (private copy needs GCC's libstdc++.a)")
    return()
  endif()
  execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libstdc++.a
                  OUTPUT_VARIABLE _archive OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT IS_ABSOLUTE "${_archive}" OR NOT EXISTS "${_archive}")
    message(STATUS "loadkit: std::filesystem from libstdc++.so (no libstdc++.a for ${CMAKE_CXX_COMPILER})")
    return()
  endif()

  set(_dir ${PROJECT_BINARY_DIR}/stdfs)
  set(_lib ${_dir}/libloadkit_stdfs.a)
  set(_members fs_dir.o fs_ops.o fs_path.o)
  file(REMOVE_RECURSE ${_dir})
  file(MAKE_DIRECTORY ${_dir})
  execute_process(COMMAND ${CMAKE_AR} x ${_archive} ${_members} WORKING_DIRECTORY ${_dir}
                  RESULT_VARIABLE _x ERROR_QUIET)
  if(_x EQUAL 0)
    execute_process(COMMAND ${CMAKE_AR} qcs ${_lib} ${_members} WORKING_DIRECTORY ${_dir} RESULT_VARIABLE _x)
  endif()
  if(NOT _x EQUAL 0)
    message(STATUS "loadkit: std::filesystem from libstdc++.so (${_archive} has no ${_members})")
    return()
  endif()

  # One option, not several: CMake de-duplicates link options, and a second --pop-state (the
  # top-level CMakeLists.txt has one) would be dropped, leaving --whole-archive on.
  set(_option "LINKER:--push-state,--whole-archive,${_lib},--pop-state,--exclude-libs,libloadkit_stdfs.a")
  # The members must link into a shared library (PIC) and be complete with libstdc++.so.
  set(_probe ${_dir}/probe)
  file(WRITE ${_probe}/CMakeLists.txt [=[
cmake_minimum_required(VERSION 3.25)
project(stdfs_probe CXX)
set(CMAKE_CXX_STANDARD 20)
add_library(probe SHARED probe.cpp)
target_link_options(probe PRIVATE "LINKER:--no-undefined" "${STDFS_OPTION}")
]=])
  file(WRITE ${_probe}/probe.cpp
       "#include <filesystem>\nbool probe(const char* p) { return std::filesystem::remove_all(p) > 0; }\n")
  try_compile(_linked PROJECT stdfs_probe SOURCE_DIR ${_probe} BINARY_DIR ${_probe}/build
              CMAKE_FLAGS "-DSTDFS_OPTION=${_option}" "-DCMAKE_CXX_COMPILER=${CMAKE_CXX_COMPILER}"
              OUTPUT_VARIABLE _output)
  if(NOT _linked)
    message(STATUS "loadkit: std::filesystem from libstdc++.so (${_archive}'s members do not link into a "
                   "shared library)")
    return()
  endif()
  set(LOADKIT_PRIVATE_FILESYSTEM ${_option} CACHE INTERNAL "")
  message(STATUS "loadkit: std::filesystem linked privately into every binary (from ${_archive})")
endfunction()

_loadkit_private_filesystem()
if(LOADKIT_PRIVATE_FILESYSTEM)
  add_link_options("${LOADKIT_PRIVATE_FILESYSTEM}")
endif()
