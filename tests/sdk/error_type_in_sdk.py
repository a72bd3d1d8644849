#!/usr/bin/env python3
"""loadkit::Error's vtable and typeinfo live in libloadkit_sdk and nowhere else.

An exception a plugin throws may be caught after the plugin was unloaded
(sdk/include/loadkit/error.h says why), so its type's vtable and typeinfo must
not be in the plugin. Checked on the binaries, with nm:

  1. libloadkit_sdk.so defines and exports both (dynamic symbol table);
  2. no plugin defines either, in its dynamic or its full symbol table — the
     shipped plugins, the example plugin and the tests' plugins;
  3. a plugin that throws loadkit::Error itself (deepseek_v2: its own attention
     checks its config; the others mostly leave that to the SDK's ConfigReader)
     refers to the SDK's typeinfo as an undefined dynamic symbol.

    error_type_in_sdk.py BUILD_DIR
"""
import glob
import os
import subprocess
import sys

SYMBOLS = {"_ZTVN7loadkit5ErrorE": "vtable", "_ZTIN7loadkit5ErrorE": "typeinfo", "_ZTSN7loadkit5ErrorE": "typeinfo name"}


def symbols(path, *flags):
    out = subprocess.run(["nm", *flags, path], check=True, text=True, capture_output=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()}


def main():
    build = sys.argv[1]
    sdk = os.path.realpath(os.path.join(build, "lib", "libloadkit_sdk.so"))
    exported = symbols(sdk, "-D", "--defined-only")
    for sym in ("_ZTVN7loadkit5ErrorE", "_ZTIN7loadkit5ErrorE"):
        assert sym in exported, f"{sdk} does not export loadkit::Error's {SYMBOLS[sym]} ({sym})"

    plugins = sorted(glob.glob(os.path.join(build, "lib", "loadkit", "plugins", "*.so")) +
                     glob.glob(os.path.join(build, "test-plugins", "*", "*.so")))
    assert any(p.endswith("/deepseek_v2.so") for p in plugins), f"no deepseek_v2.so among {plugins}"
    for plugin in plugins:
        defined = symbols(plugin, "--defined-only") | symbols(plugin, "-D", "--defined-only")
        for sym, what in SYMBOLS.items():
            assert sym not in defined, f"{plugin} defines loadkit::Error's {what} ({sym}): it would be unloaded with it"
    thrower = next(p for p in plugins if p.endswith("/deepseek_v2.so"))
    assert "_ZTIN7loadkit5ErrorE" in symbols(thrower, "-D", "--undefined-only"), \
        f"{thrower} throws loadkit::Error but does not refer to the SDK's typeinfo"
    print(f"ok: loadkit::Error's vtable and typeinfo only in {sdk}; {len(plugins)} plugins checked")


if __name__ == "__main__":
    main()
