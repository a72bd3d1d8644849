# loadkit_add_plugin(<target> <sources>...)
#
# Builds a loadkit plugin: a MODULE library linked to loadkit::sdk, hidden
# visibility so that only the entry symbol (loadkit_plugin_v1, marked by
# LOADKIT_PLUGIN) is exported, named <target>.so. In loadkit's own build it
# lands in the build tree's plugin directory.
function(loadkit_add_plugin target)
  add_library(${target} MODULE ${ARGN})
  target_link_libraries(${target} PRIVATE loadkit::sdk)
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
