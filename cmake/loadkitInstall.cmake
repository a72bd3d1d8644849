# `cmake --install`: headers, libloadkit_sdk, the `loadkit` CLI with its
# runtime and shipped plugins, and the CMake package (find_package(loadkit)
# gives loadkit::sdk and loadkit_add_plugin). Layout, fixed because the CLI
# finds its plugins relative to itself (registry.h):
#   bin/loadkit  lib/libloadkit_{sdk,runtime}.so  lib/loadkit/plugins/*.so
#   include/loadkit/...  lib/cmake/loadkit/
include(CMakePackageConfigHelpers)
set(LOADKIT_INSTALL_CMAKEDIR lib/cmake/loadkit)

# Installed binaries find our libraries next to them and libtorch where it was linked from.
set_target_properties(loadkit PROPERTIES INSTALL_RPATH "$ORIGIN/../lib" INSTALL_RPATH_USE_LINK_PATH ON)
set_target_properties(loadkit_runtime loadkit_sdk PROPERTIES INSTALL_RPATH "$ORIGIN" INSTALL_RPATH_USE_LINK_PATH ON)
set_target_properties(loadkit_sdk PROPERTIES EXPORT_NAME sdk)

install(TARGETS loadkit_sdk EXPORT loadkitTargets
        LIBRARY DESTINATION lib
        INCLUDES DESTINATION include)
install(DIRECTORY ${PROJECT_SOURCE_DIR}/sdk/include/loadkit DESTINATION include)
install(TARGETS loadkit_runtime LIBRARY DESTINATION lib)
install(TARGETS loadkit RUNTIME DESTINATION bin)

# The plugins under plugins/ ship; the example and the tests' broken plugins do not.
get_property(_loadkit_plugins GLOBAL PROPERTY LOADKIT_PLUGIN_TARGETS)
foreach(_plugin IN LISTS _loadkit_plugins)
  get_target_property(_dir ${_plugin} SOURCE_DIR)
  string(FIND "${_dir}/" "${PROJECT_SOURCE_DIR}/plugins/" _at)
  if(_at EQUAL 0)
    set_target_properties(${_plugin} PROPERTIES INSTALL_RPATH "$ORIGIN/../.." INSTALL_RPATH_USE_LINK_PATH ON)
    install(TARGETS ${_plugin} LIBRARY DESTINATION lib/loadkit/plugins)
  endif()
endforeach()

install(EXPORT loadkitTargets NAMESPACE loadkit:: DESTINATION ${LOADKIT_INSTALL_CMAKEDIR})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/loadkitConfig.cmake.in
                              ${PROJECT_BINARY_DIR}/loadkitConfig.cmake
                              INSTALL_DESTINATION ${LOADKIT_INSTALL_CMAKEDIR})
# The SDK carries a plugin ABI: a plugin built against 0.x loads into any 0.y host of the same major.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/loadkitConfigVersion.cmake
                                 COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/loadkitConfig.cmake ${PROJECT_BINARY_DIR}/loadkitConfigVersion.cmake
              ${CMAKE_CURRENT_LIST_DIR}/loadkitPlugin.cmake
        DESTINATION ${LOADKIT_INSTALL_CMAKEDIR})
