#!/usr/bin/env python3
"""A Python server process that reloads and updates its model step after step, some of the calls
failing, holds nothing more for it (ctest python.steady_state, python.steady_state_cuda).

    test_steady_state.py --device cpu|cuda [name patterns]

In a child interpreter with a deadline, each model runs a cycle of good and failed reloads and of
one-shot, streamed and failed updates from tensors the trainer makes fresh each time and drops
afterwards; two ranks (torchrun's variables, Gloo or NCCL) run a cycle of FSDP syncs, one of them
failing on both. After a warm-up the cycle runs twice CYCLES times; a leak grows both halves alike.
  - Every tensor the trainer passed is freed once it drops it: after update() returns, after
    finish_update(), after a chunk refused with InputError, after a sync (weakrefs).
  - Open file descriptors and, on CUDA, the caching allocator's bytes in use stay equal; Python
    objects (the garbage collector's count), heap in use over every arena (glibc's malloc_info)
    and threads grow by no more than their slack below, each measured here.
  - The model still equals a fresh load of the checkpoint each cycle ends on (logits).
A server that swaps models opens, runs and closes one every cycle, and fails to open another.
"""
import os
import shutil
import tempfile
import unittest

import harness

harness.skip_without_module()

import loadkit  # noqa: E402
import torch  # noqa: E402

FIXTURES = harness.fixtures()
DEADLINE_S = 300
CYCLES = 25
# Python objects: a cycle makes hundreds of tensors and dicts and frees them; measured on the CPU,
# 1 more object over the first 25 cycles after the warm-up and none over the next. 25 over 25
# cycles: less than one object a cycle.
OBJECT_SLACK = 25
# Heap in use over every arena (glibc's malloc_info): measured on the CPU after the warm-up, up to
# 14 KiB over 25 cycles of one process, 7 KiB a half on each of two FSDP ranks once Gloo's buffers
# have grown (50 cycles: 1.5 MiB over the first 25, 0.14 MiB over the next). 256 KiB over 25
# cycles is 10 KiB a cycle; the store that kept every exchange's payload grew rank 0 by 19 KiB.
HEAP_SLACK = 256 << 10
# The children run with glibc's per-thread caches off: what they hold varies from one quiet point
# to the next and would only add noise to the heap in use.
QUIET_HEAP = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
FSDP_WARMUP = 50
# Threads: Gloo may start one more the first time a message size needs it (seen once, 8 -> 9 on
# rank 0 over the first half, never again); a thread kept per cycle would be 25.
THREAD_SLACK = 2

MEASURE = r"""
import ctypes, gc, json, os, re
import torch

_libc = ctypes.CDLL(None)
_libc.open_memstream.restype = ctypes.c_void_p
_libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.free.argtypes = [ctypes.c_void_p]

def heap_in_use():
    # glibc's malloc_info() over every arena (Gloo's and torch's threads allocate in theirs): the
    # bytes its heaps hold from the system, less their free chunks, plus chunks mapped on their own.
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = _libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    _libc.malloc_info(0, stream)
    _libc.fclose(stream)
    xml = ctypes.string_at(buf, size.value).decode()
    _libc.free(buf)
    totals = xml[xml.rfind("</heap>"):]
    value = lambda element, kind: int(re.search(f'<{element} type="{kind}"[^>]* size="([0-9]+)"', totals).group(1))
    return value("system", "current") - value("total", "fast") - value("total", "rest") + value("total", "mmap")

def footprint(device):
    gc.collect()
    if device != "cpu":
        torch.cuda.synchronize(device)
    return {"objects": len(gc.get_objects()), "fds": len(os.listdir("/proc/self/fd")),
            "threads": len(os.listdir("/proc/self/task")), "heap": heap_in_use(),
            "device": torch.cuda.memory_allocated(device) if device != "cpu" else 0}

def run(cycle, device):
    # A warm-up, then the footprint after it and after each of two halves of CYCLES cycles.
    for _ in range(WARMUP):
        cycle()
    marks = [footprint(device)]
    for _ in range(2):
        for _ in range(CYCLES):
            cycle()
        marks.append(footprint(device))
    return marks
"""

CYCLE = r"""
import weakref
import loadkit
from safetensors.torch import load_file

loadkit.set_log_level("error")
model = loadkit.Model(A, device=DEVICE, quantization=QUANT)
trainer = {}
for f in sorted(os.listdir(UPDATE)):
    if f.endswith(".safetensors"):
        trainer.update(load_file(os.path.join(UPDATE, f), device=DEVICE))
names = sorted(trainer)
freed = {"one_shot": True, "streamed": True, "failed_chunk": True}

def fresh(keys):
    return {k: trainer[k].clone() for k in keys}

def all_dead(refs):
    gc.collect()
    return all(r() is None for r in refs)

def expect_input_error(fn):
    try:
        fn()
    except loadkit.InputError:
        return
    raise AssertionError("no InputError")

def cycle():
    model.reload(B)
    expect_input_error(lambda: model.reload(TRUNCATED))
    # One shot: the trainer's tensors, dropped after the call.
    chunk = fresh(names)
    refs = [weakref.ref(t) for t in chunk.values()]
    model.update(chunk)
    del chunk
    freed["one_shot"] &= all_dead(refs)
    # Streamed in two chunks, then a chunk of a wrong shape (refused whole), then finished.
    model.begin_update()
    refs = []
    for part in (names[: len(names) // 2], names[len(names) // 2:]):
        chunk = fresh(part)
        refs += [weakref.ref(t) for t in chunk.values()]
        model.update(chunk)
        del chunk
    bad = {"model.embed_tokens.weight": torch.zeros(3, 5, dtype=torch.bfloat16, device=DEVICE)}
    bad_ref = weakref.ref(bad["model.embed_tokens.weight"])
    expect_input_error(lambda: model.update(bad))
    del bad
    freed["failed_chunk"] &= all_dead([bad_ref])
    model.finish_update()
    freed["streamed"] &= all_dead(refs)

marks = run(cycle, DEVICE)
fresh_model = loadkit.Model(A, device=DEVICE, quantization=QUANT)
tokens = TOKENS
same = torch.equal(model.logits(tokens), fresh_model.logits(tokens))
print(json.dumps({"marks": marks, "freed": freed, "same_logits": same}))
"""


def expect_steady(test, out, who=""):
    """A child's JSON: its footprints after the warm-up and after each half, whether the tensors
    it passed were freed, and whether its model equals a fresh load."""
    start, middle, end = out["marks"]
    trace = f"{who}after the warm-up {start}, after {CYCLES} cycles {middle}, after {2 * CYCLES} {end}"
    for kind, freed in out["freed"].items():
        test.assertTrue(freed, f"{who}a {kind} update kept the trainer's tensors alive")
    test.assertEqual(end["fds"], start["fds"], trace)
    test.assertEqual(end["device"], start["device"], trace)
    for before, after in ((start, middle), (middle, end)):
        test.assertLessEqual(after["objects"] - before["objects"], OBJECT_SLACK, trace)
        test.assertLessEqual(after["heap"] - before["heap"], HEAP_SLACK, trace)
        test.assertLessEqual(after["threads"] - before["threads"], THREAD_SLACK, trace)
    test.assertTrue(out["same_logits"], f"{who}after the cycles the model differs from a fresh load")


class SteadyState(unittest.TestCase):
    device = "cpu"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="loadkit-steady-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_cycles(self, model, other, update, quant):
        """`model` loaded, cycled, and checked; `update` holds its trainer's tensors (16-bit)."""
        a, b = FIXTURES[model], FIXTURES[other]
        truncated = shutil.copytree(b["dir"], os.path.join(self.tmp, model + "-truncated"), dirs_exist_ok=True)
        last = max(f for f in os.listdir(truncated) if f.endswith(".safetensors"))
        with open(os.path.join(truncated, last), "r+b") as f:
            f.truncate(os.path.getsize(os.path.join(truncated, last)) - 7)
        result = harness.run_child(
            f"A = {a['dir']!r}\nB = {b['dir']!r}\nUPDATE = {FIXTURES[update]['dir']!r}\n"
            f"TRUNCATED = {truncated!r}\nDEVICE = {self.device!r}\nQUANT = {quant!r}\n"
            f"TOKENS = {a['tokens']!r}\nCYCLES = {CYCLES}\nWARMUP = 3\n" + MEASURE + CYCLE,
            DEADLINE_S, env=QUIET_HEAP)
        self.assertIsNone(result.verdict(), result.verdict())
        expect_steady(self, result.last_json())

    def setUp(self):
        if self.device == "cuda" and not torch.cuda.is_available():
            self.skipTest(harness.CUDA_SKIP)

    def test_dense_bf16(self):
        self.run_cycles("llama_bf16_gqa_tied", "llama_bf16_gqa_tied_b", "llama_bf16_gqa_tied", "none")

    def test_moe_online_fp8(self):
        self.run_cycles("deepseek_v3_bf16_qlora", "deepseek_v3_bf16_qlora_b", "deepseek_v3_bf16_qlora", "fp8")

    def test_moe_block_fp8_quantized_on_sync(self):
        self.run_cycles("deepseek_v3_blockfp8", "deepseek_v3_blockfp8_b", "deepseek_v3_blockfp8_bf16src", "auto")

    def test_models_loaded_and_closed(self):
        a = FIXTURES["deepseek_v3_blockfp8"]
        result = harness.run_child(
            f"A = {a['dir']!r}\nDEVICE = {self.device!r}\nQUANT = 'auto'\nTOKENS = {a['tokens']!r}\n"
            f"CYCLES = {CYCLES}\nWARMUP = 3\n" + MEASURE + OPEN_CLOSE_CYCLE,
            DEADLINE_S, env=QUIET_HEAP)
        self.assertIsNone(result.verdict(), result.verdict())
        expect_steady(self, result.last_json())


OPEN_CLOSE_CYCLE = r"""
import loadkit

loadkit.set_log_level("error")

def cycle():
    # A server that swaps models: one loaded, run and closed (its plugins unloaded), and one that
    # fails to load.
    with loadkit.Model(A, device=DEVICE, quantization=QUANT) as model:
        model.logits(TOKENS)
    try:
        loadkit.Model(A + "/missing", device=DEVICE)
    except loadkit.InputError:
        pass
    else:
        raise AssertionError("a missing directory loaded")

with loadkit.Model(A, device=DEVICE, quantization=QUANT) as first:
    before = first.logits(TOKENS)
marks = run(cycle, DEVICE)
with loadkit.Model(A, device=DEVICE, quantization=QUANT) as last:
    same = torch.equal(last.logits(TOKENS), before)
print(json.dumps({"marks": marks, "freed": {}, "same_logits": same}))
"""


FSDP_CYCLE = r"""
import weakref
import loadkit
from safetensors.torch import load_file

loadkit.set_log_level("error")
group = loadkit.RankGroup.join(DEVICE)
device = f"cuda:{group.rank}" if DEVICE == "cuda" else "cpu"
model = loadkit.Model(A, device=device, quantization=QUANT)

def checkpoint(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f), device=device))
    return out

a_state, b_state = checkpoint(A), checkpoint(B)
freed = True

def sync(state):
    # What a trainer does each step: its parameters, then dropped (the whole tensors here; each
    # rank passes its FSDP rows of them).
    global freed
    fresh = {k: v.clone() for k, v in state.items()}
    refs = [weakref.ref(t) for t in fresh.values()]
    model.sync_fsdp_shards(group, list(fresh.items()))
    del fresh
    gc.collect()
    freed &= all(r() is None for r in refs)

def cycle():
    sync(b_state)
    bad = [("model.layers.0.mlp.nowhere.weight", torch.zeros(4, 4, device=device))] + list(a_state.items())
    try:
        model.sync_fsdp_shards(group, bad)
    except loadkit.InputError:
        pass
    else:
        raise AssertionError("an unknown tensor was accepted")
    del bad
    sync(a_state)

marks = run(cycle, device)
same = torch.equal(model.logits(TOKENS), loadkit.Model(A, device=device, quantization=QUANT).logits(TOKENS))
print(json.dumps({"marks": marks, "freed": {"fsdp_sync": freed}, "same_logits": same}))
"""


class FsdpSyncSteadyState(unittest.TestCase):
    """Two ranks, each its own process under torchrun's variables, sync from a trainer's FSDP
    shards every cycle, one sync failing (an unknown name) on both; nothing grows on either."""
    device = "cpu"
    ranks = 2

    def setUp(self):
        if self.device == "cuda" and torch.cuda.device_count() < self.ranks:
            self.skipTest(f"needs {self.ranks} CUDA devices; {torch.cuda.device_count()} here")
        if not loadkit.rank_backends()[self.device]:
            self.skipTest(f"this build has no process-group backend for {self.device} (loadkit.rank_backends())")

    def test_dense_bf16(self):
        a, b = FIXTURES["llama_bf16_gqa_tied"], FIXTURES["llama_bf16_gqa_tied_b"]
        script = (f"A = {a['dir']!r}\nB = {b['dir']!r}\nDEVICE = {self.device!r}\nQUANT = 'none'\n"
                  f"TOKENS = {a['tokens']!r}\nCYCLES = {CYCLES}\nWARMUP = {FSDP_WARMUP}\n" + MEASURE + FSDP_CYCLE)
        for rank, result in enumerate(harness.run_ranks(script, self.ranks, DEADLINE_S, env=QUIET_HEAP)):
            self.assertIsNone(result.verdict(), f"rank {rank}: {result.verdict()}")
            expect_steady(self, result.last_json(), f"rank {rank}: ")


class SteadyStateCuda(SteadyState):
    device = "cuda"


class FsdpSyncSteadyStateCuda(FsdpSyncSteadyState):
    device = "cuda"


if __name__ == "__main__":
    harness.main({"cpu": [SteadyState, FsdpSyncSteadyState], "cuda": [SteadyStateCuda, FsdpSyncSteadyStateCuda]})
