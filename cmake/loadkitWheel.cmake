# Wheel builds (`pip install .`, `pip wheel .`; scikit-build-core sets SKBUILD and passes the
# building environment's interpreter as Python_EXECUTABLE; pyproject.toml sets the options).
#
# The interpreter that builds is the one the extension is for, and its torch is the one
# everything links: its CMake package is found through it, as ./run.sh does for LOADKIT_PYTHON.
# The install prefix is the package folder itself (wheel.install-dir), so the layout below it is
# the usual one and the binaries' relative RPATHs hold: loadkit/bin/loadkit,
# loadkit/lib/libloadkit_*.so, loadkit/lib/loadkit/plugins/*.so (the plugins the runtime finds
# next to itself), loadkit/include and loadkit/lib/cmake (the SDK, for out-of-tree plugins), and
# the Python package at its root (LOADKIT_PYTHON_INSTALL_DIR "."). torch's own libraries are found
# by soname once `import torch` has loaded them; the console command (loadkit/_cli.py) puts them
# on LD_LIBRARY_PATH for the CLI binary.
if(NOT SKBUILD)
  return()
endif()
if(NOT Python_EXECUTABLE)
  message(FATAL_ERROR "loadkit: a wheel build without Python_EXECUTABLE (scikit-build-core passes it)")
endif()
set(LOADKIT_PYTHON "${Python_EXECUTABLE}" CACHE FILEPATH "Python with torch" FORCE)
execute_process(COMMAND ${LOADKIT_PYTHON} -c "import torch; print(torch.utils.cmake_prefix_path)"
                OUTPUT_VARIABLE _loadkit_torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE
                ERROR_VARIABLE _loadkit_torch_error RESULT_VARIABLE _loadkit_torch_rc)
if(NOT _loadkit_torch_rc EQUAL 0)
  message(FATAL_ERROR "loadkit: the wheel is built against the torch of ${LOADKIT_PYTHON}, which cannot "
                      "import it (install torch there, or build with isolation): ${_loadkit_torch_error}")
endif()
list(PREPEND CMAKE_PREFIX_PATH ${_loadkit_torch_prefix})
message(STATUS "loadkit: wheel build for ${LOADKIT_PYTHON} against ${_loadkit_torch_prefix}")
