#!/usr/bin/env python3
"""`pip wheel .` and `pip install` of the result into a fresh venv that has our torch, as a user
would (ctest python.wheel).

    test_wheel.py --device cpu [name patterns]

Environment: LOADKIT_SOURCE_DIR (the repo), LOADKIT_FIXTURES, LOADKIT_CXX (the compiler of the
main build), LOADKIT_CCACHE (its compiler launcher, or empty), LOADKIT_JOBS.

torch is never downloaded: the venv sees the site-packages of the interpreter running this test
through a .pth file, and the wheel is built without isolation against that torch. The backend
(scikit-build-core) comes from PyPI once and is kept in ~/.cache/loadkit/wheels (a machine with
neither skips the test, saying so). The build
directory is <repo>/build-wheel, at the depth of build/, so that ccache (CCACHE_BASEDIR = the repo)
serves its compiles from the main build's; the hit rate is printed.

Then, with only the venv's own paths: `import loadkit` finds the installed package and its plugins,
its logits equal transformers' on a fixture, an update after an optimizer step equals transformers
again; the venv's `loadkit` command lists the plugins and passes exit codes through; and
python.api's and python.std_filesystem's tests run against the installed package.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

import harness

harness.skip_without_module()

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ["LOADKIT_SOURCE_DIR"]
BACKEND = "scikit-build-core>=1.1"
WHEELHOUSE = os.path.expanduser("~/.cache/loadkit/wheels")
FIXTURES = harness.fixtures()


def run(cmd, **kw):
    """Runs a command, its output kept for the failure message."""
    result = subprocess.run(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: exit {result.returncode}\n{result.stdout[-6000:]}")
    return result.stdout


def clean_env(**extra):
    """The environment without the build tree's package on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LOADKIT_PLUGIN_PATH", "LOADKIT_BUILD_DIR", "PYTHONHOME")}
    env.update(extra)
    return env


class Wheel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="loadkit-wheel-")
        cls.venv = os.path.join(cls.tmp, "venv")
        run([sys.executable, "-m", "venv", cls.venv])
        cls.python = os.path.join(cls.venv, "bin", "python")
        site = run([cls.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
        cls.site = site
        # Our torch (and transformers, safetensors) without installing them: their site-packages.
        torch_site = os.path.dirname(os.path.dirname(torch.__file__))
        with open(os.path.join(site, "loadkit-test-torch.pth"), "w") as f:
            f.write(torch_site + "\n")
        cls.install_backend()
        cls.wheel, cls.build_log = cls.build_wheel()
        run([cls.python, "-m", "pip", "install", "--no-index", "--quiet", cls.wheel], env=clean_env())

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def install_backend(cls):
        pip = [cls.python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", WHEELHOUSE, BACKEND]
        if subprocess.run(pip, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            download = subprocess.run([cls.python, "-m", "pip", "download", "--quiet", "--dest", WHEELHOUSE, BACKEND],
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if download.returncode != 0:
                shutil.rmtree(cls.tmp, ignore_errors=True)
                last = (download.stdout.strip().splitlines() or ["?"])[-1]
                raise unittest.SkipTest(f"the build backend ({BACKEND}) is neither in {WHEELHOUSE} nor "
                                        f"downloadable here: {last}")
            run(pip)

    @classmethod
    def build_wheel(cls):
        dist = os.path.join(cls.tmp, "dist")
        stats = os.path.join(cls.tmp, "ccache.log")
        env = clean_env(CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("LOADKIT_JOBS") or str(os.cpu_count()))
        if os.environ.get("LOADKIT_CXX"):
            env["CXX"] = os.environ["LOADKIT_CXX"]  # the same compiler path: part of ccache's key
        launcher = os.environ.get("LOADKIT_CCACHE", "")
        if launcher:
            env.update(CMAKE_CXX_COMPILER_LAUNCHER=launcher, CCACHE_BASEDIR=SOURCE, CCACHE_NOHASHDIR="true",
                       CCACHE_STATSLOG=stats)
            env.setdefault("CCACHE_DIR", os.path.expanduser("~/.cache/loadkit/ccache"))
        log = run([cls.python, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
                   "--wheel-dir", dist, SOURCE], env=env, cwd=cls.tmp)
        if os.path.exists(stats):
            results = [line.strip() for line in open(stats) if line.strip() and not line.startswith("#")]
            hits = results.count("direct_cache_hit") + results.count("preprocessed_cache_hit")
            compiles = hits + results.count("cache_miss")
            print(f"wheel build: ccache {hits}/{compiles} compiles served from the cache")
        wheels = glob.glob(os.path.join(dist, "loadkit-*.whl"))
        assert len(wheels) == 1, (wheels, log[-3000:])
        return wheels[0], log

    def venv_python(self, script, timeout=600):
        child = harness.run_child(script, timeout, env=clean_env(), python=self.python)
        self.assertIsNone(child.verdict(), child.verdict())
        return child

    def test_installed_package_loads_updates_and_matches_transformers(self):
        fixture = FIXTURES["llama_fp32_gqa_sharded"]
        child = self.venv_python(f"""
            import os, loadkit, torch, transformers
            package = os.path.dirname(loadkit.__file__)
            assert package.startswith({self.site!r}), package
            loadkit.set_log_level("warn")
            path, tokens = {fixture["dir"]!r}, {fixture["tokens"]!r}
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()

            def reference():
                with torch.no_grad():
                    return hf(torch.tensor([tokens])).logits[0]

            with loadkit.Model(path) as model:
                assert model.report["plugin"].startswith(package), model.report["plugin"]
                assert (model.logits(tokens) - reference()).abs().max().item() <= 1e-4
                optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-2, weight_decay=0.1)
                ids = torch.tensor([tokens])
                hf(ids, labels=ids).loss.backward()
                optimizer.step()
                before = model.logits(tokens)
                report = model.update(hf.named_parameters())
                after = model.logits(tokens)
                assert report["pointers_stable"] and not report["untouched_modules"], report
                assert (after - reference()).abs().max().item() <= 1e-4
                assert (after - before).abs().max().item() > 1e-2  # the update did change the model
            print("ok", loadkit.__version__)
        """)
        self.assertEqual(child.stdout.split()[-2], "ok", child.stdout)

    def test_console_command_lists_the_plugins_and_passes_exit_codes_through(self):
        command = os.path.join(self.venv, "bin", "loadkit")
        listed = subprocess.run([command, "plugins", "list"], env=clean_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=self.tmp)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        plugins_dir = os.path.join(self.site, "loadkit", "lib", "loadkit", "plugins")
        self.assertIn(f"search path: {plugins_dir}", listed.stdout)
        for name in ("llama", "quant", "gpt2"):
            self.assertIn(os.path.join(plugins_dir, f"{name}.so"), listed.stdout)
        self.assertNotIn("broken", listed.stdout)
        fixture = FIXTURES["llama_fp32_gqa_sharded"]
        for args, code in ((["load", "--model", fixture["dir"]], 0),
                           (["inspect", "--model", os.path.join(self.tmp, "missing")], 3),
                           (["load", "--model", fixture["dir"], "--dtype", "float8"], 2)):
            with self.subTest(args=args):
                done = subprocess.run([command, *args], env=clean_env(), text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, cwd=self.tmp)
                self.assertEqual(done.returncode, code, done.stderr)

    def test_api_and_std_filesystem_tests_pass_against_the_installed_package(self):
        installed = os.path.join(self.site, "loadkit")
        # The package's surface (the bindings themselves are python.api's, on the build tree) and every
        # installed binary's std::filesystem.
        for script, selection in (("test_api.py", ["Package"]), ("test_std_filesystem.py", [])):
            with self.subTest(script=script):
                env = clean_env(LOADKIT_BINARIES=installed)
                done = subprocess.run([self.python, os.path.join(HERE, script), "--device", "cpu", *selection],
                                      env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      timeout=600)
                self.assertEqual(done.returncode, 0, done.stdout[-6000:])


if __name__ == "__main__":
    harness.main({"cpu": [Wheel]})
