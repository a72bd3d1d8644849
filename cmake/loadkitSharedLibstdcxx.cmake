# Every binary we link uses the shared libstdc++ (libstdc++.so.6), named first
# among its NEEDED entries.
#
# First: libtorch's wheels export their own, older copy of parts of libstdc++
# (std::filesystem). Unless libstdc++ comes first in a binary's library search
# order, our calls bind to that copy (remove_all crashed there). That orders
# our own lookup scope only; loadkitPrivateFilesystem.cmake binds those calls at
# link time as well.
#
# Shared, always: a toolchain may ship libstdc++.a alone (the GPU machine's
# /opt/gcc does). There `-lstdc++` copies the whole library into every binary
# of ours and exports it from each. A Python process that imported torch first
# then ran our extension on libloadkit_sdk's copy and torch on the system's:
# two libstdc++ in one process, and a segfault in the first call that crossed
# them (tests/python/test_std_filesystem.py checks every binary for this).
# Where the compiler has no libstdc++.so, the system's libstdc++.so.6 (the one
# torch runs on) is linked by path. It must be at least as new as the
# compiler's headers; an older one fails the link with the missing
# GLIBCXX_ version named, not at run time.
#
# Installed with the SDK: loadkit_add_plugin (loadkitPlugin.cmake) links a
# third party's plugin the same way, with loadkit_link_shared_libstdcxx.

set(LOADKIT_LIBSTDCXX "" CACHE INTERNAL "what the link names for libstdc++")

function(_loadkit_shared_libstdcxx)
  if(NOT CMAKE_CXX_COMPILER)  # a project without C++ (it links nothing)
    return()
  endif()
  execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libstdc++.so
                  OUTPUT_VARIABLE _so OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(IS_ABSOLUTE "${_so}" AND EXISTS "${_so}")
    set(LOADKIT_LIBSTDCXX "-lstdc++" CACHE INTERNAL "")
    return()
  endif()
  find_file(_system_so NAMES libstdc++.so.6 NO_CACHE NO_DEFAULT_PATH
            PATHS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE} /lib/${CMAKE_LIBRARY_ARCHITECTURE} /usr/lib64 /lib64 /usr/lib)
  if(NOT _system_so)
    message(FATAL_ERROR "loadkit: ${CMAKE_CXX_COMPILER} has no libstdc++.so and no system libstdc++.so.6 was "
                        "found: every binary would carry its own copy of libstdc++ (see ${CMAKE_CURRENT_LIST_FILE})")
  endif()
  set(LOADKIT_LIBSTDCXX "${_system_so}" CACHE INTERNAL "")
  message(STATUS "loadkit: ${CMAKE_CXX_COMPILER} has libstdc++.a only; linking the system's ${_system_so}")
endfunction()

_loadkit_shared_libstdcxx()
set(LOADKIT_LIBSTDCXX_LINK_OPTIONS "LINKER:--push-state,--no-as-needed" "${LOADKIT_LIBSTDCXX}" "LINKER:--pop-state")

# loadkit_link_shared_libstdcxx(<target>): the link options above, for one target.
function(loadkit_link_shared_libstdcxx target)
  target_link_options(${target} PRIVATE ${LOADKIT_LIBSTDCXX_LINK_OPTIONS})
endfunction()
