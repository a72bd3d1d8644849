#!/usr/bin/env python3
"""A Python server process that reloads and updates its model step after step, some of the calls
failing, holds nothing more for it (ctest python.steady_state, python.steady_state_cuda).

    test_steady_state.py --device cpu|cuda [name patterns]

Each model runs a cycle of good and failed reloads and one-shot, streamed and failed updates from
tensors the trainer makes fresh each time and drops afterwards, in a child interpreter with a
deadline. After a warm-up the cycle runs twice CYCLES times; a leak grows both halves alike.
  - Every tensor the trainer passed is freed once it drops it: after update() returns, after
    finish_update(), and after a chunk that failed validation (weakrefs, no copy kept).
  - Python objects (the garbage collector's count), open file descriptors, threads and, on CUDA,
    the caching allocator's bytes in use do not grow; resident memory grows by no more than the
    host allocator's noise.
  - The model still equals a fresh load of the checkpoint each cycle ends on (logits and report).
"""
import os
import shutil
import tempfile
import unittest

import harness

harness.skip_without_module()

import torch  # noqa: E402

FIXTURES = harness.fixtures()
DEADLINE_S = 300
CYCLES = 25
# Python objects: a cycle makes hundreds of tensors and dicts and frees them; measured on the CPU,
# 1 more object over the first 25 cycles after the warm-up and none over the next. 25 over 25
# cycles: less than one object a cycle.
OBJECT_SLACK = 25
# Resident memory: glibc keeps freed chunks, and torch's CPU tensors come and go in mapped blocks;
# measured on the CPU, -0.5 to +1.3 MiB over 25 cycles. Anything kept per cycle that the checks
# above miss (a copy of a trainer's tensor in C++) would be 25 copies.
RSS_SLACK = 8 << 20

CYCLE = r"""
import gc, json, os, weakref
import torch
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

def footprint():
    gc.collect()
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"objects": len(gc.get_objects()), "fds": len(os.listdir("/proc/self/fd")),
            "threads": len(os.listdir("/proc/self/task")), "rss": rss,
            "device": torch.cuda.memory_allocated() if DEVICE != "cpu" else 0}

for _ in range(3):
    cycle()
marks = [footprint()]
for _ in range(2):
    for _ in range(CYCLES):
        cycle()
    marks.append(footprint())
fresh_model = loadkit.Model(A, device=DEVICE, quantization=QUANT)
tokens = TOKENS
same = torch.equal(model.logits(tokens), fresh_model.logits(tokens))
print(json.dumps({"marks": marks, "freed": freed, "same_logits": same}))
"""


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
            f"TOKENS = {a['tokens']!r}\nCYCLES = {CYCLES}\n" + CYCLE, DEADLINE_S)
        self.assertIsNone(result.verdict(), result.verdict())
        out = result.last_json()
        start, middle, end = out["marks"]
        trace = f"after the warm-up {start}, after {CYCLES} cycles {middle}, after {2 * CYCLES} {end}"
        for kind, freed in out["freed"].items():
            self.assertTrue(freed, f"a {kind} update kept the trainer's tensors alive")
        self.assertEqual(end["fds"], start["fds"], trace)
        self.assertEqual(end["threads"], start["threads"], trace)
        self.assertEqual(end["device"], start["device"], trace)
        for before, after in ((start, middle), (middle, end)):
            self.assertLessEqual(after["objects"] - before["objects"], OBJECT_SLACK, trace)
            self.assertLessEqual(after["rss"] - before["rss"], RSS_SLACK, trace)
        self.assertTrue(out["same_logits"], "after the cycles the model differs from a fresh load")

    def setUp(self):
        if self.device == "cuda" and not torch.cuda.is_available():
            self.skipTest(harness.CUDA_SKIP)

    def test_dense_bf16(self):
        self.run_cycles("llama_bf16_gqa_tied", "llama_bf16_gqa_tied_b", "llama_bf16_gqa_tied", "none")

    def test_moe_online_fp8(self):
        self.run_cycles("deepseek_v3_bf16_qlora", "deepseek_v3_bf16_qlora_b", "deepseek_v3_bf16_qlora", "fp8")

    def test_moe_block_fp8_quantized_on_sync(self):
        self.run_cycles("deepseek_v3_blockfp8", "deepseek_v3_blockfp8_b", "deepseek_v3_blockfp8_bf16src", "auto")


class SteadyStateCuda(SteadyState):
    device = "cuda"


if __name__ == "__main__":
    harness.main({"cpu": [SteadyState], "cuda": [SteadyStateCuda]})
