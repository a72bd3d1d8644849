# loadkit_add_plugin(<target> <sources>...)
#
# Builds a loadkit plugin: a MODULE library linked to loadkit::sdk, hidden
# visibility so that only the entry symbol (loadkit_plugin_v1, marked by
# LOADKIT_PLUGIN) is exported, named <target>.so. In loadkit's own build it
# lands in the build tree's plugin directory. Linked to the shared libstdc++
# whatever the toolchain ships (loadkitSharedLibstdcxx.cmake says why).
if(NOT COMMAND loadkit_link_shared_libstdcxx)
  include(${CMAKE_CURRENT_LIST_DIR}/loadkitSharedLibstdcxx.cmake)
endif()

function(loadkit_add_plugin target)
  add_library(${target} MODULE ${ARGN})
  target_link_libraries(${target} PRIVATE loadkit::sdk)
  loadkit_link_shared_libstdcxx(${target})
  set_target_properties(${target} PROPERTIES
    PREFIX ""
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON)
  if(DEFINED LOADKIT_PLUGIN_OUTPUT_DIR)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${LOADKIT_PLUGIN_OUTPUT_DIR})
    set_property(GLOBAL APPEND PROPERTY LOADKIT_PLUGIN_TARGETS ${target})
  endif()
  if(COMMAND loadkit_warnings)
    loadkit_warnings(${target})
  endif()
endfunction()
