"""What the checks of the installed package share: loadkit's build tree
installed into a temporary prefix, and one of examples/ configured and built
against it as its own CMake project, the way a third party would.

    <check>.py BUILD_DIR SOURCE_DIR FIXTURES_DIR CXX GENERATOR [LAUNCHER]
"""
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file


def run(cmd, **kw):
    """Runs `cmd`, echoing it; its output (stdout and stderr) as text; raises on failure."""
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw).stdout


@dataclasses.dataclass
class Package:
    build: str     # loadkit's build tree
    source: str    # loadkit's source tree
    fixtures: str  # the test fixtures
    cxx: str
    generator: str
    launcher: str
    tmp: str       # scratch space, removed afterwards
    prefix: str    # where the build tree was installed

    def fixture(self, name):
        """The fixture manifest's entry for `name` (its "tokens", ...), with its directory as "dir"."""
        manifest = json.load(open(os.path.join(self.fixtures, "fixtures.json")))
        entry = next(f for f in manifest["fixtures"] if f["name"] == name)
        return dict(entry, dir=os.path.join(self.fixtures, name))

    def expect_reference_logits(self, name, logits_file, what):
        """Tensor `logits` of `logits_file` equals transformers' logits for fixture `name` (fp32: 1e-4)."""
        ours = load_file(logits_file)["logits"]
        ref = load_file(os.path.join(self.fixtures, "references", name + ".safetensors"))["logits"]
        assert ours.shape == ref.shape, (ours.shape, ref.shape)
        diff = (ours - ref).abs().max().item()
        print(f"{what} vs transformers: max |diff| = {diff:.3e}")
        assert diff <= 1e-4, diff

    def build_example(self, example, project):
        """Configures examples/<example> in `project` against the prefix (and this Python's torch), builds it."""
        configure = ["cmake", "-S", os.path.join(self.source, "examples", example), "-B", project,
                     "-G", self.generator, f"-DCMAKE_CXX_COMPILER={self.cxx}", "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={self.prefix};{torch.utils.cmake_prefix_path}"]
        if self.launcher:
            configure.append(f"-DCMAKE_CXX_COMPILER_LAUNCHER={self.launcher}")
        run(configure)
        run(["cmake", "--build", project])


@contextlib.contextmanager
def installed_package(name):
    """The command line's trees, with the build tree installed into a fresh prefix under a temporary
    directory named after `name`; everything is removed afterwards."""
    build, source, fixtures, cxx, generator = sys.argv[1:6]
    launcher = sys.argv[6] if len(sys.argv) > 6 else ""
    tmp = tempfile.mkdtemp(prefix=f"loadkit-{name}-")
    try:
        prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", build, "--prefix", prefix])
        yield Package(build, source, fixtures, cxx, generator, launcher, tmp, prefix)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
