#!/usr/bin/env python3
"""loadkit's std::filesystem calls never reach libtorch's copy (ctest python.std_filesystem, and
python.std_filesystem_cuda for a CUDA load; cmake/loadkitPrivateFilesystem.cmake says why).

    test_std_filesystem.py --device cpu|cuda [name patterns]

Environment as for the other Python tests; LOADKIT_BUILD_DIR (or LOADKIT_BINARIES, a folder to
search instead: an installed package) names the binaries to check.

1. Statically: none of our binaries (libloadkit_*, plugins, the extension, the CLI) imports a
   std::filesystem symbol: they are bound at link time (`nm -D --undefined-only`).
2. At run time, with `import torch` first — plainly, and with TORCH_USE_RTLD_GLOBAL=1, which puts
   libtorch and its std::filesystem in the global scope, ahead of libstdc++ — a load, a reload
   and plugin discovery: the dynamic linker's bindings (LD_DEBUG=bindings) of std::filesystem
   symbols referenced by our binaries go to our binaries or libstdc++, never to libtorch. The
   hostile case is shown to be real: there, the global scope's std::filesystem::remove_all (what
   an unversioned lookup finds first) is libtorch's.
"""
import os
import re
import shutil
import subprocess
import tempfile
import unittest

import harness

harness.skip_without_module()

import torch  # noqa: E402

FIXTURES = harness.fixtures()
FILESYSTEM = re.compile(r"St10filesystem")  # std::filesystem in mangled names (also inside templates)
REMOVE_ALL = "_ZNSt10filesystem10remove_allERKNS_7__cxx114pathE"
BINDING = re.compile(r"binding file (\S+) \[\d+\] to (\S+) \[\d+\]: normal symbol `([^']+)'")


def our_binaries():
    """Every ELF file we built: shared libraries, plugins, the extension, executables."""
    root = os.environ.get("LOADKIT_BINARIES") or os.environ["LOADKIT_BUILD_DIR"]
    candidates = [os.path.join(root, f) for f in os.listdir(root)]  # an installed package's extension
    for folder in ("lib", "bin", "python"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            candidates += [os.path.join(dirpath, f) for f in files]
    found = set()
    for path in candidates:
        name = os.path.basename(path)
        in_bin = os.path.basename(os.path.dirname(path)) == "bin"
        if os.path.islink(path) or not os.path.isfile(path) or not (".so" in name or in_bin):
            continue
        with open(path, "rb") as fh:
            if fh.read(4) == b"\x7fELF":
                found.add(os.path.realpath(path))
    return sorted(found)


def is_ours(path, binaries):
    return os.path.realpath(path) in binaries


class Filesystem(unittest.TestCase):
    device = "cpu"

    @classmethod
    def setUpClass(cls):
        cls.binaries = our_binaries()

    def test_no_binary_of_ours_imports_a_std_filesystem_symbol(self):
        # Shared libraries carry their version after ".so" (libloadkit_runtime.so.1.0.0).
        names = {re.sub(r"\.so(\.\d+)+$", ".so", os.path.basename(b)) for b in self.binaries}
        for expected in ("libloadkit_runtime.so", "llama.so", "loadkit"):
            self.assertIn(expected, names)
        for binary in self.binaries:
            undefined = subprocess.run(["nm", "-D", "--undefined-only", binary], check=True, text=True,
                                       stdout=subprocess.PIPE).stdout
            imported = [line.split()[-1] for line in undefined.splitlines() if FILESYSTEM.search(line)]
            self.assertEqual(imported, [], binary)

    def test_every_binary_of_ours_runs_on_the_shared_libstdcxx(self):
        # A toolchain with libstdc++.a alone copies all of libstdc++ into each binary and
        # exports it (cmake/loadkitSharedLibstdcxx.cmake): two libstdc++ in a process that
        # imported torch first. The symbols below exist only in libstdc++ itself.
        own_copy = ("__gxx_personality_v0", "_ZNSt8ios_base4InitC1Ev", "_ZNSt6locale7classicEv")
        for binary in self.binaries:
            dynamic = subprocess.run(["readelf", "-d", "-W", binary], check=True, text=True,
                                     stdout=subprocess.PIPE).stdout
            self.assertIn("[libstdc++.so.6]", dynamic, f"{binary}: libstdc++.so.6 is not among its NEEDED entries")
            defined = subprocess.run(["nm", "-D", "--defined-only", binary], check=True, text=True,
                                     stdout=subprocess.PIPE).stdout.split()
            self.assertEqual([sym for sym in own_copy if sym in defined], [], f"{binary} exports libstdc++'s own symbols")

    def bindings_after_torch(self, rtld_global):
        """Runs import torch → import loadkit → load, reload, plugins() in a child under
        LD_DEBUG=bindings; returns the std::filesystem bindings of our binaries (file, bound to,
        symbol) and the file that defines remove_all in the global scope (None: not there)."""
        f = FIXTURES["llama_fp32_gqa_sharded"]
        target = FIXTURES[f["reload_target"]]
        logs = tempfile.mkdtemp(prefix="loadkit-ld-")
        self.addCleanup(shutil.rmtree, logs, ignore_errors=True)
        env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=os.path.join(logs, "ld"))
        env.pop("TORCH_USE_RTLD_GLOBAL", None)
        if rtld_global:
            env["TORCH_USE_RTLD_GLOBAL"] = "1"
        child = harness.run_child(f"""
            import torch
            import loadkit
            loadkit.set_log_level("warn")
            with loadkit.Model({f["dir"]!r}, device={self.device!r}) as model:
                model.reload({target["dir"]!r})
                model.reload()
                assert model.report["pointers_stable"]
            assert any(p["name"] == "llama" and p["status"] == "ok" for p in loadkit.plugins())

            import ctypes, json
            class DlInfo(ctypes.Structure):
                _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                            ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]
            scope = ctypes.CDLL(None)  # dlopen(NULL): lookups in the global scope
            try:
                address = ctypes.cast(scope[{REMOVE_ALL!r}], ctypes.c_void_p)
            except AttributeError:
                print(json.dumps(None))
            else:
                info = DlInfo()
                scope.dladdr(address, ctypes.byref(info))
                print(json.dumps(info.fname.decode()))
        """, 300, env=env)
        self.assertIsNone(child.verdict(), child.verdict())
        ours = []
        for name in os.listdir(logs):
            for line in open(os.path.join(logs, name), errors="replace"):
                m = BINDING.search(line)
                if not m or not FILESYSTEM.search(m.group(3)):
                    continue
                source, bound_to, symbol = m.groups()
                if is_ours(source, self.binaries):
                    ours.append((os.path.basename(source), bound_to, symbol))
        return ours, child.last_json()

    def check_bindings(self, rtld_global):
        ours, global_remove_all = self.bindings_after_torch(rtld_global)
        wrong = [(s, b, sym) for s, b, sym in ours
                 if not (is_ours(b, self.binaries) or os.path.basename(b).startswith("libstdc++.so"))]
        self.assertEqual(wrong, [])
        return global_remove_all

    def test_torch_imported_first(self):
        self.check_bindings(rtld_global=False)

    def test_torch_imported_first_into_the_global_scope(self):
        global_remove_all = self.check_bindings(rtld_global=True)
        self.assertIsNotNone(global_remove_all, "no std::filesystem in the global scope: the case tests nothing")
        self.assertIn("libtorch", os.path.basename(global_remove_all), "libtorch's copy is not first: the case "
                      "tests nothing")


class FilesystemCpu(Filesystem):
    device = "cpu"


@unittest.skipUnless(torch.cuda.is_available(), harness.CUDA_SKIP)
class FilesystemCuda(Filesystem):
    device = "cuda"


if __name__ == "__main__":
    harness.main({"cpu": [FilesystemCpu], "cuda": [FilesystemCuda]})
