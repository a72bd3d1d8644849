# The torch-free core alone: the parsers (loadkit_formats: safetensors and the
# index; loadkit_jobs: YAML jobs), their GoogleTest suites and, with
# LOADKIT_FUZZ, their libFuzzer targets. No libtorch, so that sanitizer and
# fuzz builds compile in well under a minute.
#
#   cmake -S . -B build-asan -DLOADKIT_SANITIZE=address,undefined     (gcc or clang)
#   cmake -S . -B build-fuzz -DLOADKIT_FUZZ=ON -DLOADKIT_SANITIZE=address,undefined -DCMAKE_CXX_COMPILER=clang++
#
# Included by the top-level CMakeLists.txt (after loadkitWarnings.cmake) instead
# of the full build when either option is set; tests/core/run_core.sh drives
# both from ctest.
set(LOADKIT_CORE_ONLY ON)
find_package(nlohmann_json 3 REQUIRED)

if(LOADKIT_SANITIZE)
  add_compile_options(-fsanitize=${LOADKIT_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${LOADKIT_SANITIZE})
endif()
if(LOADKIT_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "LOADKIT_FUZZ needs clang (libFuzzer), not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  # Library code gets coverage instrumentation; only fuzz targets link libFuzzer's main.
  add_compile_options(-fsanitize=fuzzer-no-link)
endif()

add_subdirectory(runtime)  # stops after loadkit_formats and loadkit_jobs (LOADKIT_CORE_ONLY)

if(LOADKIT_BUILD_TESTS)
  enable_testing()
  include(${CMAKE_CURRENT_LIST_DIR}/loadkitGTest.cmake)
  # The torch-free helpers; the paths they bake in are unused by the core tests.
  add_library(loadkit_test_support STATIC tests/support/test_support.cpp)
  target_include_directories(loadkit_test_support PUBLIC tests/support)
  target_link_libraries(loadkit_test_support PUBLIC GTest::gtest nlohmann_json::nlohmann_json)
  target_compile_definitions(loadkit_test_support PRIVATE LOADKIT_TEST_CLI="" LOADKIT_TEST_PLUGIN_DIR=""
                             LOADKIT_TEST_BAD_PLUGINS_DIR="" LOADKIT_TEST_FIXTURES_DIR="")
  # The torch-free suites, each on the one library it tests.
  function(loadkit_core_test name library)
    add_executable(${name} tests/${name}.cpp)
    target_link_libraries(${name} PRIVATE ${library} loadkit_test_support GTest::gtest_main)
    loadkit_warnings(${name})
    gtest_discover_tests(${name} DISCOVERY_MODE PRE_TEST)
  endfunction()
  loadkit_core_test(test_safetensors_reader loadkit_formats)
  loadkit_core_test(test_jobs loadkit_jobs)
  target_compile_definitions(test_jobs PRIVATE LOADKIT_TEST_CONFIGS_DIR="${PROJECT_SOURCE_DIR}/configs")
endif()

if(LOADKIT_FUZZ)
  add_subdirectory(tests/fuzz)
endif()
