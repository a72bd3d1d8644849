#!/usr/bin/env python3
"""CI check of the installed SDK, as a third party would use it:

  1. `cmake --install` loadkit's build tree into a temporary prefix;
  2. build examples/plugin_template as its own CMake project against that
     prefix (find_package(loadkit), which forwards find_dependency(Torch)),
     with a compiler that has libstdc++.a only, as the GPU machine's has;
  3. check the plugin runs on the shared libstdc++ and exports only its entry
     symbol (of its own code);
  4. drop the .so into a fresh plugin directory and run the *installed*
     `loadkit logits` on a Granite fixture: equal to transformers' logits;
  5. the installed CLI alone (no plugin directory) does not serve Granite (exit 4), and
     serves Qwen3 from its shipped plugins;
  6. the package is SameMajorVersion: asking for loadkit 1.0 fails to configure.

    installed_plugin.py BUILD_DIR SOURCE_DIR FIXTURES_DIR CXX GENERATOR [LAUNCHER]
"""
import dataclasses
import json
import os
import shutil
import stat
import subprocess

import torch

from installed_package import installed_package, run

FIXTURE = "granite_fp32_gqa"
# Symbols only libstdc++ itself defines: a plugin that exports them carries its own copy.
LIBSTDCXX_OWN = ("__gxx_personality_v0", "_ZNSt8ios_base4InitC1Ev", "_ZNSt6locale7classicEv")


def static_only_compiler(cxx, folder):
    """A wrapper of `cxx` that behaves like a toolchain shipping libstdc++.a alone: it links
    libstdc++ statically and has no libstdc++.so to name (cmake/loadkitSharedLibstdcxx.cmake)."""
    wrapper = os.path.join(folder, "cxx-static-libstdcxx")
    with open(wrapper, "w") as f:
        f.write(f"""#!/bin/sh
for arg in "$@"; do
  [ "$arg" = "-print-file-name=libstdc++.so" ] && {{ echo libstdc++.so; exit 0; }}
done
exec {cxx} -static-libstdc++ "$@"
""")
    os.chmod(wrapper, os.stat(wrapper).st_mode | stat.S_IXUSR)
    return wrapper


def main():
    with installed_package("sdk") as package:
        tmp, prefix = package.tmp, package.prefix
        project = os.path.join(tmp, "plugin-build")
        static_only = dataclasses.replace(package, cxx=static_only_compiler(shutil.which(package.cxx) or package.cxx, tmp))
        static_only.build_example("plugin_template", project)
        built = os.path.join(project, "granite.so")
        assert os.path.isfile(built), "the example built no granite.so"

        # One libstdc++ per process: the plugin needs the shared one, whatever its toolchain ships.
        assert "[libstdc++.so.6]" in run(["readelf", "-d", "-W", built]), "libstdc++.so.6 is not among granite.so's NEEDED"
        exported = run(["nm", "-D", "--defined-only", built]).split()
        assert not [s for s in LIBSTDCXX_OWN if s in exported], "granite.so exports its own copy of libstdc++"

        # Hidden visibility: of the plugin's own (strong) symbols only the entry is exported.
        # Weak symbols are libtorch's inline templates, which keep the visibility torch gives them.
        symbols = run(["nm", "-D", "--defined-only", built]).split("\n")
        strong = sorted(line.split()[-1] for line in symbols if len(line.split()) == 3 and line.split()[1] in "TDBR")
        assert strong == ["loadkit_plugin_v1"], f"exported symbols: {strong}"

        drop = os.path.join(tmp, "fresh-plugins")
        os.makedirs(drop)
        shutil.copy(built, drop)
        loadkit = os.path.join(prefix, "bin", "loadkit")
        env = {k: v for k, v in os.environ.items() if k != "LOADKIT_PLUGIN_PATH"}

        listing = json.loads(run([loadkit, "plugins", "list", "--json", "--plugin-dir", drop], env=env))
        mine = [p for p in listing["plugins"] if p["file"] == os.path.join(drop, "granite.so")]
        assert mine and mine[0]["status"] == "ok", listing
        assert mine[0]["architectures"] == ["GraniteForCausalLM"], mine
        assert mine[0]["torch_version"] == torch.__version__.split("+")[0], mine

        fx = package.fixture(FIXTURE)
        model = fx["dir"]
        out = os.path.join(tmp, "logits.safetensors")
        tokens = ",".join(map(str, fx["tokens"]))
        run([loadkit, "logits", "--model", model, "--tokens", tokens, "--out", out, "--plugin-dir", drop], env=env)
        package.expect_reference_logits(FIXTURE, out, "installed loadkit + out-of-tree granite.so")

        alone = subprocess.run([loadkit, "logits", "--model", model, "--tokens", tokens, "--out", out],
                               env=env, text=True, capture_output=True)
        assert alone.returncode == 4, (alone.returncode, alone.stderr)
        assert "'GraniteForCausalLM'" in alone.stderr, alone.stderr
        # ... while the architectures loadkit ships (Qwen3 among them) come installed with it.
        shipped = package.fixture("qwen3_fp32_gqa")
        run([loadkit, "logits", "--model", shipped["dir"], "--tokens", ",".join(map(str, shipped["tokens"])),
             "--out", out], env=env)
        package.expect_reference_logits("qwen3_fp32_gqa", out, "installed loadkit's shipped qwen3.so")
        # SameMajorVersion: the version file refuses another major before the config is read.
        other = os.path.join(tmp, "wants-major-2")
        os.makedirs(other)
        with open(os.path.join(other, "CMakeLists.txt"), "w") as f:
            f.write("cmake_minimum_required(VERSION 3.25)\nproject(wants_major_2 LANGUAGES NONE)\n"
                    "find_package(loadkit 2.0 REQUIRED)\n")
        refused = subprocess.run(["cmake", "-S", other, "-B", os.path.join(other, "build"),
                                  f"-DCMAKE_PREFIX_PATH={prefix}"], text=True, capture_output=True)
        assert refused.returncode != 0, refused.stdout
        assert "version: 1.0.0" in refused.stderr and "\"2.0\"" in refused.stderr, refused.stderr
        print("ok")


if __name__ == "__main__":
    main()
