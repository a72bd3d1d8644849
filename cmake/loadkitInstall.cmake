# loadkit as a CMake package: find_package(loadkit) gives
#   loadkit::sdk      the SDK (headers, libloadkit_sdk), for plugins, with loadkit_add_plugin()
#   loadkit::runtime  the host library (headers under loadkit/runtime/, libloadkit_runtime),
#                     for C++ hosts that load, reload and update models (examples/host/)
# from an install prefix or, through export(), straight from this build tree
# (-Dloadkit_DIR=<build>). Install rules only with LOADKIT_INSTALL (on when top level).
#
# Layout, fixed relative to itself because libloadkit_runtime finds the shipped
# plugins at <its directory>/loadkit/plugins (registry.h), in the build tree as
# once installed:
#   bin/loadkit  lib/libloadkit_{sdk,runtime}.so  lib/loadkit/plugins/*.so
#   include/loadkit/...  lib/cmake/loadkit/
# Destinations are variables so that another layout (a Python wheel's) can set them.
include(CMakePackageConfigHelpers)
set(LOADKIT_INSTALL_BINDIR bin CACHE STRING "Install destination of the loadkit CLI")
set(LOADKIT_INSTALL_LIBDIR lib CACHE STRING "Install destination of libloadkit_sdk and libloadkit_runtime")
set(LOADKIT_INSTALL_INCLUDEDIR include CACHE STRING "Install destination of the headers")
# Not a choice of its own: the runtime looks for its plugins next to itself.
set(LOADKIT_INSTALL_PLUGINDIR ${LOADKIT_INSTALL_LIBDIR}/loadkit/plugins)
set(LOADKIT_INSTALL_CMAKEDIR ${LOADKIT_INSTALL_LIBDIR}/cmake/loadkit)

set_target_properties(loadkit_sdk PROPERTIES EXPORT_NAME sdk)
set(_loadkit_exported loadkit_sdk loadkit_runtime)
# The SDK carries a plugin ABI: a plugin built against 0.x loads into any 0.y host of the same major.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/loadkitConfigVersion.cmake COMPATIBILITY SameMajorVersion)

# ---------------------------------------------------------------- the build tree as a package
export(TARGETS ${_loadkit_exported} NAMESPACE loadkit:: FILE ${PROJECT_BINARY_DIR}/loadkitTargets.cmake)
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/loadkitConfig.cmake.in ${PROJECT_BINARY_DIR}/loadkitConfig.cmake
                              INSTALL_DESTINATION ${PROJECT_BINARY_DIR} INSTALL_PREFIX ${PROJECT_BINARY_DIR}
                              PATH_VARS LOADKIT_INSTALL_PLUGINDIR)
configure_file(${CMAKE_CURRENT_LIST_DIR}/loadkitPlugin.cmake ${PROJECT_BINARY_DIR}/loadkitPlugin.cmake COPYONLY)
configure_file(${CMAKE_CURRENT_LIST_DIR}/loadkitSharedLibstdcxx.cmake ${PROJECT_BINARY_DIR}/loadkitSharedLibstdcxx.cmake
               COPYONLY)

if(NOT LOADKIT_INSTALL)
  return()
endif()

# ---------------------------------------------------------------- install
# Installed binaries find our libraries next to them and libtorch where it was linked from.
set_target_properties(loadkit PROPERTIES INSTALL_RPATH "$ORIGIN/../${LOADKIT_INSTALL_LIBDIR}" INSTALL_RPATH_USE_LINK_PATH ON)
set_target_properties(loadkit_runtime loadkit_sdk PROPERTIES INSTALL_RPATH "$ORIGIN" INSTALL_RPATH_USE_LINK_PATH ON)

install(TARGETS ${_loadkit_exported} EXPORT loadkitTargets
        LIBRARY DESTINATION ${LOADKIT_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${LOADKIT_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/sdk/include/loadkit DESTINATION ${LOADKIT_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/runtime/include/loadkit/runtime DESTINATION ${LOADKIT_INSTALL_INCLUDEDIR}/loadkit)
install(TARGETS loadkit RUNTIME DESTINATION ${LOADKIT_INSTALL_BINDIR})

# The plugins under plugins/ ship; the example and the tests' broken plugins do not.
get_property(_loadkit_plugins GLOBAL PROPERTY LOADKIT_PLUGIN_TARGETS)
foreach(_plugin IN LISTS _loadkit_plugins)
  get_target_property(_dir ${_plugin} SOURCE_DIR)
  string(FIND "${_dir}/" "${PROJECT_SOURCE_DIR}/plugins/" _at)
  if(_at EQUAL 0)
    set_target_properties(${_plugin} PROPERTIES INSTALL_RPATH "$ORIGIN/../.." INSTALL_RPATH_USE_LINK_PATH ON)
    install(TARGETS ${_plugin} LIBRARY DESTINATION ${LOADKIT_INSTALL_PLUGINDIR})
  endif()
endforeach()

install(EXPORT loadkitTargets NAMESPACE loadkit:: DESTINATION ${LOADKIT_INSTALL_CMAKEDIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/loadkitConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/install-package/loadkitConfig.cmake
                              INSTALL_DESTINATION ${LOADKIT_INSTALL_CMAKEDIR}
                              PATH_VARS LOADKIT_INSTALL_PLUGINDIR)
install(FILES ${PROJECT_BINARY_DIR}/install-package/loadkitConfig.cmake ${PROJECT_BINARY_DIR}/loadkitConfigVersion.cmake
              ${CMAKE_CURRENT_LIST_DIR}/loadkitPlugin.cmake ${CMAKE_CURRENT_LIST_DIR}/loadkitSharedLibstdcxx.cmake
        DESTINATION ${LOADKIT_INSTALL_CMAKEDIR})
