#!/usr/bin/env python3
"""CI check of the installed runtime, as a C++ host (a server, a trainer) uses it:

  1. `cmake --install` loadkit's build tree into a temporary prefix: the runtime's
     public headers and the CMake package with loadkit::runtime are there;
  2. build examples/host as its own CMake project against that prefix
     (find_package(loadkit) → loadkit::runtime, which forwards Torch);
  3. the program links the *installed* libloadkit_runtime (ldd);
  4. run it: load a Llama fixture, update it in memory from a second checkpoint's
     tensors, and compare the logits it writes with transformers' logits for that
     second checkpoint (fp32: max |diff| <= 1e-4); its report says every layer
     was written and every kernel tensor kept its storage;
  5. a bad model directory is exit 3 with one line.

    installed_host.py BUILD_DIR SOURCE_DIR FIXTURES_DIR CXX GENERATOR [LAUNCHER]
"""
import json
import os
import subprocess

from installed_package import installed_package, run

MODEL, UPDATE = "llama_fp32_gqa_sharded", "llama_fp32_gqa_b"


def main():
    with installed_package("host") as package:
        tmp, prefix = package.tmp, package.prefix
        for header in ("engine.h", "registry.h", "reload_types.h", "tensor_files.h", "weight_sync.h"):
            assert os.path.isfile(os.path.join(prefix, "include", "loadkit", "runtime", header)), header
        targets = open(os.path.join(prefix, "lib", "cmake", "loadkit", "loadkitTargets.cmake")).read()
        assert "loadkit::runtime" in targets and "loadkit::sdk" in targets, "the package exports no loadkit::runtime"

        project = os.path.join(tmp, "host-build")
        package.build_example("host", project)
        host = os.path.join(project, "loadkit_host")
        assert os.path.isfile(host), "the example built no loadkit_host"

        env = {k: v for k, v in os.environ.items() if k not in ("LOADKIT_PLUGIN_PATH", "LD_LIBRARY_PATH")}
        linked = [line for line in run(["ldd", host], env=env).splitlines() if "libloadkit_runtime" in line]
        assert linked and os.path.join(prefix, "lib") in linked[0], f"not the installed runtime: {linked}"

        update = package.fixture(UPDATE)
        out = os.path.join(tmp, "logits.safetensors")
        tokens = ",".join(map(str, update["tokens"]))
        done = subprocess.run([host, "--model", package.fixture(MODEL)["dir"], "--update-from", update["dir"],
                               "--tokens", tokens, "--out", out], env=env, text=True, capture_output=True)
        print(done.stderr, flush=True)
        assert done.returncode == 0, (done.returncode, done.stderr)
        report = json.loads(done.stdout)
        assert report["pointers_stable"] is True, report
        assert report["layers_processed"] > 0 and report["untouched_modules"] == [], report
        package.expect_reference_logits(UPDATE, out, "installed loadkit::runtime host, updated in memory,")

        bad = subprocess.run([host, "--model", os.path.join(tmp, "absent"), "--update-from", update["dir"],
                              "--tokens", "1", "--out", out],
                             env=env, text=True, capture_output=True)
        lines = [line for line in bad.stderr.splitlines() if "error:" in line]
        assert bad.returncode == 3 and len(lines) == 1 and "absent" in lines[0], (bad.returncode, bad.stderr)
        print("ok")


if __name__ == "__main__":
    main()
