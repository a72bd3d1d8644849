"""What the Python test scripts share: the fixtures, a child interpreter with a deadline, and the
ctest entry point (`--device cpu|cuda`, exit 77 when every test was skipped).

Environment (set by tests/CMakeLists.txt): PYTHONPATH=<build>/python, LOADKIT_FIXTURES,
LOADKIT_BUILD_DIR, LOADKIT_PYTHON_MODULE_MISSING (the reason, when CMake could not build the module).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import unittest

CUDA_SKIP = "no CUDA device here; runs on the GPU machine"
FP32_TOLERANCE = 1e-4


def skip_without_module():
    """Exits 77 (ctest: skipped) with the reason when the build has no Python module."""
    if os.environ.get("LOADKIT_PYTHON_MODULE_MISSING"):
        print(f"SKIPPED: the loadkit Python module was not built: {os.environ['LOADKIT_PYTHON_MODULE_MISSING']}")
        sys.exit(77)


def fixtures():
    """name → manifest entry of every generated fixture (tests/fixtures/gen_fixtures.py)."""
    path = os.path.join(os.environ["LOADKIT_FIXTURES"], "fixtures.json")
    return {f["name"]: f for f in json.load(open(path))["fixtures"]}


class Child:
    """What a child interpreter did: its exit status and its output."""

    def __init__(self, returncode, stdout, stderr, timed_out):
        self.returncode, self.stdout, self.stderr, self.timed_out = returncode, stdout, stderr, timed_out

    def verdict(self):
        """None when it exited 0; else why not, for an assertion message."""
        if self.timed_out:
            return f"hung: no exit within the deadline\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}\nstderr:\n{self.stderr}"
        if self.returncode != 0:
            return f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        return None

    def last_json(self):
        """The last stdout line, parsed: how a child script reports its measurements."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def run_child(script, timeout, env=None, python=None):
    """Runs `script` (dedented) in a fresh interpreter; a hang is killed at `timeout` seconds and
    reported as such, never waited for."""
    proc = subprocess.Popen([python or sys.executable, "-c", textwrap.dedent(script)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, errors="backslashreplace")
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return Child(proc.returncode, stdout, stderr, False)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return Child(proc.returncode, stdout, stderr, True)


def run_ranks(script, world, timeout, env=None):
    """Runs `script` (dedented) in `world` fresh interpreters at once, each a rank as torchrun
    starts it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port); at
    `timeout` seconds every rank still running is killed and reported as hung. `env`: the
    environment (default: this one) the rank variables are added to. Children in rank order."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ if env is None else env, RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, errors="backslashreplace"))
    deadline = time.monotonic() + timeout
    children = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            children.append(Child(proc.returncode, stdout, stderr, False))
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            children.append(Child(proc.returncode, stdout, stderr, True))
    return children


def main(suites):
    """ctest entry: `script.py --device cpu|cuda [name patterns]` runs suites[device]."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=sorted(suites), default="cpu")
    args, rest = parser.parse_known_args()
    loader = unittest.TestLoader()
    if rest:
        loader.testNamePatterns = rest  # -k style selection: fnmatch patterns
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in suites[args.device])
    result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
    # Everything skipped (a class's set-up may skip all of its tests at once: then none "ran").
    if result.skipped and len(result.skipped) >= result.testsRun and result.wasSuccessful():
        reasons = sorted({reason for _, reason in result.skipped})
        print(f"SKIPPED: all {result.testsRun} tests: {'; '.join(reasons)}")
        sys.exit(77)
    sys.exit(0 if result.wasSuccessful() else 1)
