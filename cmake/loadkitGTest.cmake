# GoogleTest for the test suites, found once for both builds (the full one, tests/, and the
# torch-free core, cmake/loadkitCore.cmake): the system package, or its sources where only
# those exist (Debian's googletest; or LOADKIT_GTEST_SOURCE_DIR). Gives GTest::gtest_main and
# the GoogleTest module's gtest_discover_tests.
find_package(GTest QUIET)
if(NOT TARGET GTest::gtest_main)
  set(_gtest_src "$ENV{LOADKIT_GTEST_SOURCE_DIR}")
  if(NOT _gtest_src AND EXISTS /usr/src/googletest/CMakeLists.txt)
    set(_gtest_src /usr/src/googletest)
  endif()
  if(NOT _gtest_src)
    message(FATAL_ERROR "GoogleTest not found (install libgtest-dev or set LOADKIT_GTEST_SOURCE_DIR)")
  endif()
  set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
  add_subdirectory(${_gtest_src} ${CMAKE_BINARY_DIR}/googletest EXCLUDE_FROM_ALL)
  add_library(GTest::gtest_main ALIAS gtest_main)
endif()
include(GoogleTest)
