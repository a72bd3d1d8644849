#!/usr/bin/env python3
"""A process that imported loadkit is never frozen, killed or handed undecodable text by it
(ctest python.host_safety on the CPU, python.host_safety_cuda on CUDA).

    test_host_safety.py --device cpu|cuda [name patterns]

Each scenario runs in a child interpreter with a deadline: a hang or a signal fails the test.
  - GIL and lock order: a heartbeat thread keeps beating (gaps under 50 ms) while one thread
    reloads and another polls `report`/`updating` (which wait for the reload); an fp8 streaming
    update whose caller dropped its tensors frees them outside the model's lock (a finalizer that
    calls back into the model would deadlock under it).
  - Interpreter exit while daemon threads are inside reload/update: exit 0, no abort.
  - Paths as bytes, os.PathLike and surrogate-escaped str (os.listdir's non-UTF-8 names); error
    messages quoting non-UTF-8 bytes are InputError with printable, escaped text.
"""
import json
import os
import shutil
import sys
import tempfile
import unittest

import harness

harness.skip_without_module()

import loadkit  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

FIXTURES = harness.fixtures()
loadkit.set_log_level("warn")
HEARTBEAT_LIMIT_S = 0.050
LONG_HOLD_S = 0.3
DEADLINE_S = 180


def medium_checkpoint(out):
    """A random Llama of ~10 M parameters (40 MB fp32) that takes sequences up to 8192 tokens."""
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=384, intermediate_size=1024,
                                      num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                                      max_position_embeddings=8192)
    torch.manual_seed(5)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


class HostCase(unittest.TestCase):
    device = "cpu"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="loadkit-host-")
        cls.medium = medium_checkpoint(os.path.join(cls.tmp, "medium"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def child(self, script, **values):
        """Runs `script` with PATH, DEVICE and `values` defined; fails on a hang or a signal."""
        prelude = f"PATH = {self.medium!r}\nDEVICE = {self.device!r}\n"
        prelude += "".join(f"{k} = {v!r}\n" for k, v in values.items())
        result = harness.run_child(prelude + script, DEADLINE_S)
        self.assertIsNone(result.verdict(), result.verdict())
        return result


# ------------------------------------------------------------------------------------ GIL, lock order

HEARTBEAT = """
import json, threading, time
import loadkit
loadkit.set_log_level("warn")
stop = threading.Event()
worst_gap = [0.0]

def heartbeat():
    last = time.perf_counter()
    while not stop.is_set():
        time.sleep(0.002)
        now = time.perf_counter()
        worst_gap[0] = max(worst_gap[0], now - last)
        last = now

def run_with_heartbeat(*workers):
    beat = threading.Thread(target=heartbeat)
    beat.start()
    time.sleep(0.1)
    threads = [threading.Thread(target=w) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    beat.join()
"""


class GilAndLockOrder(HostCase):
    def test_polling_report_and_updating_during_reloads_keeps_other_threads_running(self):
        # The worker holds the model's lock for reloads and for logits of a sequence that doubles
        # (up to 8192 tokens, the checkpoint's longest) until two calls have held it for
        # LONG_HOLD_S: a poller waiting for the lock with the GIL held would then stall the
        # heartbeat far beyond its limit, whatever the speed of the machine.
        result = self.child(HEARTBEAT + """
model = loadkit.Model(PATH, device=DEVICE)
holds, polls, done = [], [], threading.Event()

def worker():
    tokens, longest_calls = [1] * 64, 0
    try:
        while sum(h >= LONG_HOLD_S for h in holds) < 2 and longest_calls < 10:
            for call in (model.reload, lambda: model.logits(tokens)):
                start = time.perf_counter()
                call()
                holds.append(time.perf_counter() - start)
            if holds[-1] < LONG_HOLD_S:
                if len(tokens) < 8192:
                    tokens = tokens * 2
                else:
                    longest_calls += 1
    finally:
        done.set()  # the poller stops whatever happened here

def poller():
    while not done.is_set():
        start = time.perf_counter()
        model.report
        model.updating
        polls.append(time.perf_counter() - start)

run_with_heartbeat(worker, poller)
print(json.dumps({"worst_gap": worst_gap[0], "holds": holds, "polls": len(polls), "slowest_poll": max(polls)}))
""", LONG_HOLD_S=LONG_HOLD_S)
        m = result.last_json()
        # A device can run the checkpoint's longest sequence faster than LONG_HOLD_S (the H200
        # does). A hold is still long enough to tell the poller's wait with the GIL from one
        # without it when it is well beyond the heartbeat's limit.
        hold = min(max(m["holds"]), LONG_HOLD_S)
        if hold < 4 * HEARTBEAT_LIMIT_S:
            self.skipTest(f"on {self.device} the longest call this checkpoint allows holds the lock "
                          f"{max(m['holds']):.3f} s, too short to tell a poller waiting with the GIL")
        # The poller did wait for a long hold of the lock...
        self.assertGreater(m["slowest_poll"], 0.5 * hold, m)
        # ...and did so without the GIL: the heartbeat never stalled for anything like it.
        self.assertLess(m["worst_gap"], HEARTBEAT_LIMIT_S, m)

    def test_fp8_streaming_update_frees_the_callers_tensors_outside_the_lock(self):
        # The caller hands numpy-backed tensors of every q_proj (their modules stay incomplete, so
        # loadkit keeps them) and drops its own references. Freeing such a storage needs the GIL
        # (numpy's array is released), and a finalizer on the array calls back into the model:
        # freed under the model's lock, that call would deadlock; freed with the GIL outside it, it
        # returns. Meanwhile another thread polls and a heartbeat beats.
        result = self.child(HEARTBEAT + """
import weakref
import torch
from safetensors.torch import load_file
model = loadkit.Model(PATH, device=DEVICE, quantization="fp8")
state = load_file(PATH + "/model.safetensors")
queries = sorted(n for n in state if n.endswith("q_proj.weight"))
freed, done = [], threading.Event()

def on_free(name):
    freed.append((name, model.updating, threading.current_thread().name))

def trainer():
    for round in range(2):
        model.begin_update()
        chunk = {}
        for name in queries:
            array = (state[name] * (1 + round)).numpy().copy()
            weakref.finalize(array, on_free, name)
            chunk[name] = torch.from_numpy(array)
            del array
        model.update(chunk)
        del chunk
        assert len(freed) == round * len(queries), freed  # loadkit holds them until the session ends
        model.update({n: t for n, t in state.items() if n not in queries})
        report = model.finish_update()
        assert report["pointers_stable"], report
    done.set()

def poller():
    while not done.is_set():
        model.report
        model.updating

run_with_heartbeat(trainer, poller)
print(json.dumps({"worst_gap": worst_gap[0], "freed": freed, "queries": len(queries)}))
""")
        m = result.last_json()
        self.assertEqual(len(m["freed"]), 2 * m["queries"], m)  # every array was freed, none twice
        for name, updating, thread in m["freed"]:
            self.assertFalse(updating, m)  # after the session ended, in the trainer's own call
            self.assertNotEqual(thread, "MainThread", m)
        self.assertLess(m["worst_gap"], HEARTBEAT_LIMIT_S, m)


class GilAndLockOrderCpu(GilAndLockOrder):
    device = "cpu"


@unittest.skipUnless(torch.cuda.is_available(), harness.CUDA_SKIP)
class GilAndLockOrderCuda(GilAndLockOrder):
    device = "cuda"


# ------------------------------------------------------------------------------------- exit

EXIT_WHILE_BUSY = """
import threading, time
import loadkit
from safetensors.torch import load_file
loadkit.set_log_level("warn")
model = loadkit.Model(PATH, device=DEVICE)        # reloaded by one thread or two (one waits)
trained = loadkit.Model(PATH, device=DEVICE)      # updated by another
state = load_file(PATH + "/model.safetensors")

def reloads():
    while True:
        model.reload()

def updates():
    while True:
        trained.begin_update()
        trained.update(state)
        trained.finish_update()

for work in WORK:
    threading.Thread(target=globals()[work], daemon=True).start()
time.sleep(0.5)
print("main thread done", flush=True)
"""


class InterpreterExit(HostCase):
    def check_exit(self, work):
        for attempt in range(3):  # the exit lands at a different point of the work each time
            result = self.child(EXIT_WHILE_BUSY, WORK=work)
            self.assertIn("main thread done", result.stdout)
            self.assertNotIn("terminate called", result.stderr)
            self.assertNotIn("Fatal Python error", result.stderr)

    def test_exit_while_a_daemon_thread_reloads(self):
        self.check_exit(["reloads"])

    def test_exit_while_daemon_threads_update_and_wait_for_the_lock(self):
        self.check_exit(["updates", "reloads", "reloads"])


class InterpreterExitCpu(InterpreterExit):
    device = "cpu"


@unittest.skipUnless(torch.cuda.is_available(), harness.CUDA_SKIP)
class InterpreterExitCuda(InterpreterExit):
    device = "cuda"


# ----------------------------------------------------------------------------- paths and messages


class NonUtf8(unittest.TestCase):
    """Names that are not UTF-8 (b'\\xff'), as a POSIX file system allows them."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="loadkit-bytes-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)
        self.fixture = FIXTURES["llama_fp32_gqa_sharded"]

    def linked_checkpoint(self, name, broken=None):
        """The fixture's files, linked into tmp/<name> (bytes); the file `broken` replaced by garbage."""
        target = os.path.join(os.fsencode(self.tmp), name)
        os.mkdir(target)
        for f in os.listdir(self.fixture["dir"]):
            if f == broken:
                with open(os.path.join(target, os.fsencode(f)), "wb") as out:
                    out.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
            else:
                os.symlink(os.path.join(os.fsencode(self.fixture["dir"]), os.fsencode(f)),
                           os.path.join(target, os.fsencode(f)))
        return target

    def test_bytes_surrogate_and_pathlike_paths_load_and_reload(self):
        import pathlib
        raw = self.linked_checkpoint(b"ckpt-\xff\xfe")
        listed = [n for n in os.listdir(self.tmp) if n.startswith("ckpt-")]
        self.assertEqual(listed, [os.fsdecode(b"ckpt-\xff\xfe")])  # str with surrogates
        as_str = os.path.join(self.tmp, listed[0])
        tokens = self.fixture["tokens"]
        reference = loadkit.Model(self.fixture["dir"]).logits(tokens)
        for path in (raw, as_str, pathlib.Path(as_str), pathlib.PurePosixPath(as_str)):
            with self.subTest(path=type(path).__name__):
                with loadkit.Model(path) as model:
                    self.assertTrue(torch.equal(model.logits(tokens), reference))
                    model.reload(path)
                    self.assertTrue(torch.equal(model.logits(tokens), reference))

    def test_error_quoting_non_utf8_bytes_is_an_input_error_with_escaped_text(self):
        shard = sorted(f for f in os.listdir(self.fixture["dir"]) if f.endswith(".safetensors"))[0]
        raw = self.linked_checkpoint(b"bad-\xfe\xff", broken=shard)
        with self.assertRaises(loadkit.InputError) as caught:
            loadkit.Model(raw)
        message = str(caught.exception)
        message.encode("utf-8")  # always valid text: no surrogates, nothing undecodable
        self.assertIn("bad-\\xfe\\xff/" + shard, message)
        self.assertIn(os.path.basename(self.tmp), message)
        self.assertNotIn("\n", message)
        self.assertEqual(caught.exception.exit_code, 3)
        # The same through a reload: the model stays as it was.
        model = loadkit.Model(self.fixture["dir"])
        before = model.logits(self.fixture["tokens"])
        with self.assertRaises(loadkit.InputError) as caught:
            model.reload(os.fsdecode(raw))
        str(caught.exception).encode("utf-8")
        self.assertIn("bad-\\xfe\\xff/" + shard, str(caught.exception))
        self.assertTrue(torch.equal(model.logits(self.fixture["tokens"]), before))

    def test_plugin_directory_with_a_non_utf8_name_round_trips_through_reports(self):
        plugins = os.path.join(os.fsencode(self.tmp), b"plugins-\xfd")
        os.mkdir(plugins)
        default = loadkit.Model(self.fixture["dir"]).plugin_search_path[-1]
        shutil.copy(os.path.join(default, "llama.so"), os.path.join(plugins, b"llama.so"))
        model = loadkit.Model(self.fixture["dir"], plugin_dirs=[plugins])
        self.assertEqual(os.fsencode(model.plugin_search_path[0]), plugins)
        self.assertEqual(os.fsencode(model.report["plugin"]), os.path.join(plugins, b"llama.so"))
        listed = [p for p in loadkit.plugins([plugins]) if os.fsencode(p["path"]).startswith(plugins)]
        self.assertEqual([p["status"] for p in listed], ["ok"])
        self.assertIn("LlamaForCausalLM", listed[0]["architectures"])


if __name__ == "__main__":
    harness.main({
        "cpu": [GilAndLockOrderCpu, InterpreterExitCpu, NonUtf8],
        "cuda": [GilAndLockOrderCuda, InterpreterExitCuda],
    })
