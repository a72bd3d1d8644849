# loadkit_warnings(<target>): the warnings every target of loadkit's own builds compiles with
# (the full build, the torch-free core build and plugins built in-tree).
function(loadkit_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra)
endfunction()
