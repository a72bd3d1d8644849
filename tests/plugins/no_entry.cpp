// A shared library that is no loadkit plugin: it lacks the entry symbol.
extern "C" __attribute__((visibility("default"))) int some_other_library_function() { return 42; }
