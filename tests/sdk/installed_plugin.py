#!/usr/bin/env python3
"""CI check of the installed SDK, as a third party would use it:

  1. `cmake --install` loadkit's build tree into a temporary prefix;
  2. build examples/plugin_template as its own CMake project against that
     prefix (find_package(loadkit), which forwards find_dependency(Torch));
  3. check the plugin exports only its entry symbol (of its own code);
  4. drop the .so into a fresh plugin directory and run the *installed*
     `loadkit logits` on a Granite fixture: equal to transformers' logits;
  5. the installed CLI alone (no plugin directory) does not serve Granite (exit 4), and
     serves Qwen3 from its shipped plugins;
  6. the package is SameMajorVersion: asking for loadkit 1.0 fails to configure.

    installed_plugin.py BUILD_DIR SOURCE_DIR FIXTURES_DIR CXX GENERATOR [LAUNCHER]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

FIXTURE = "granite_fp32_gqa"


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw).stdout


def main():
    build, source, fixtures, cxx, generator = sys.argv[1:6]
    launcher = sys.argv[6] if len(sys.argv) > 6 else ""
    tmp = tempfile.mkdtemp(prefix="loadkit-sdk-")
    try:
        prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", build, "--prefix", prefix])

        project = os.path.join(tmp, "plugin-build")
        configure = ["cmake", "-S", os.path.join(source, "examples", "plugin_template"), "-B", project,
                     "-G", generator, f"-DCMAKE_CXX_COMPILER={cxx}", "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path}"]
        if launcher:
            configure.append(f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}")
        run(configure)
        run(["cmake", "--build", project])
        built = os.path.join(project, "granite.so")
        assert os.path.isfile(built), "the example built no granite.so"

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

        manifest = json.load(open(os.path.join(fixtures, "fixtures.json")))
        fx = next(f for f in manifest["fixtures"] if f["name"] == FIXTURE)
        model = os.path.join(fixtures, FIXTURE)
        out = os.path.join(tmp, "logits.safetensors")
        tokens = ",".join(map(str, fx["tokens"]))
        run([loadkit, "logits", "--model", model, "--tokens", tokens, "--out", out, "--plugin-dir", drop], env=env)
        ours = load_file(out)["logits"]
        ref = load_file(os.path.join(fixtures, "references", FIXTURE + ".safetensors"))["logits"]
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        diff = (ours - ref).abs().max().item()
        print(f"installed loadkit + out-of-tree granite.so vs transformers: max |diff| = {diff:.3e}")
        assert diff <= 1e-4, diff

        alone = subprocess.run([loadkit, "logits", "--model", model, "--tokens", tokens, "--out", out],
                               env=env, text=True, capture_output=True)
        assert alone.returncode == 4, (alone.returncode, alone.stderr)
        assert "'GraniteForCausalLM'" in alone.stderr, alone.stderr
        # ... while the architectures loadkit ships (Qwen3 among them) come installed with it.
        shipped = next(f for f in manifest["fixtures"] if f["name"] == "qwen3_fp32_gqa")
        run([loadkit, "logits", "--model", shipped["dir"], "--tokens", ",".join(map(str, shipped["tokens"])),
             "--out", out], env=env)
        ref = load_file(os.path.join(fixtures, "references", "qwen3_fp32_gqa.safetensors"))["logits"]
        assert (load_file(out)["logits"] - ref).abs().max().item() <= 1e-4
        # SameMajorVersion: the version file refuses another major before the config is read.
        other = os.path.join(tmp, "wants-major-1")
        os.makedirs(other)
        with open(os.path.join(other, "CMakeLists.txt"), "w") as f:
            f.write("cmake_minimum_required(VERSION 3.25)\nproject(wants_major_1 LANGUAGES NONE)\n"
                    "find_package(loadkit 1.0 REQUIRED)\n")
        refused = subprocess.run(["cmake", "-S", other, "-B", os.path.join(other, "build"),
                                  f"-DCMAKE_PREFIX_PATH={prefix}"], text=True, capture_output=True)
        assert refused.returncode != 0, refused.stdout
        assert "version: 0.1.0" in refused.stderr and "\"1.0\"" in refused.stderr, refused.stderr
        print("ok")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
