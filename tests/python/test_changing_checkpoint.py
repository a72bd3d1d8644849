#!/usr/bin/env python3
"""A checkpoint that changes while a Python process reads it (ctest python.changing_checkpoint, and
python.changing_checkpoint_cuda on the GPU machine): truncated, rewritten in place, renamed over.

The process must never die of a signal (a mapping would give SIGBUS): every scenario runs in a
child interpreter, whose exit is checked. A load fails with InputError naming the file; a reload
either reads the version that was opened (rename) or fails naming the file, and then with
journal=True the model's logits are bit-identical to before, without it the error says the
weights are mixed and report["written_modules"] lists the layers written.

Deterministic: LOADKIT_TEST_CHANGE_FILE=<how>:<after>:<path> (runtime/src/formats/change_hook.h)
changes the file after <after> of its tensors were read, instead of racing a writer.

    test_changing_checkpoint.py --device cpu|cuda [name patterns]
"""
import json
import os
import shutil
import struct
import sys
import tempfile
import unittest

import harness

harness.skip_without_module()

import torch  # noqa: E402

FIXTURES = harness.fixtures()
MODEL = FIXTURES["llama_fp32_gqa_sharded"]
TARGET = FIXTURES[MODEL["reload_target"]]
CHANGED = "changed while it was read"
MIXED = "the weights are now mixed"


def tensors_in(path):
    """How many tensors a safetensors file holds, from its header (read here, not by loadkit)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return len([k for k in header if k != "__metadata__"])


def victim(fixture, into):
    """A copy of the fixture, the file of it to change (the second of several) and after how many
    of its tensors (half)."""
    shutil.copytree(fixture["dir"], into)
    files = sorted(f for f in os.listdir(into) if f.endswith(".safetensors"))
    path = os.path.join(into, files[1] if len(files) > 1 else files[0])
    return into, path, max(1, tensors_in(path) // 2)


# The child: runs one scenario and prints what happened as JSON on its last line.
CHILD = """
import json, os, sys
import loadkit, torch
loadkit.set_log_level("error")
MODEL, TARGET, TOKENS, DEVICE, SCENARIO, HOOK, VICTIM_DIR, JOURNAL = ARGS
out = {}
def logits(m):
    return m.logits(TOKENS).cpu()
if SCENARIO == "load":
    os.environ["LOADKIT_TEST_CHANGE_FILE"] = HOOK
    try:
        m = loadkit.Model(VICTIM_DIR, device=DEVICE)
        out["logits"] = logits(m).tolist()
    except loadkit.InputError as e:
        out["error"] = str(e)
    del os.environ["LOADKIT_TEST_CHANGE_FILE"]
    out["pristine"] = logits(loadkit.Model(MODEL, device=DEVICE)).tolist()
else:
    m = loadkit.Model(MODEL, device=DEVICE)
    before = logits(m)
    os.environ["LOADKIT_TEST_CHANGE_FILE"] = HOOK
    try:
        m.reload(VICTIM_DIR, journal=JOURNAL)
    except loadkit.InputError as e:
        out["error"] = str(e)
    del os.environ["LOADKIT_TEST_CHANGE_FILE"]
    out["report"] = {k: m.report[k] for k in ("written_modules", "error")}
    after = logits(m)
    out["unchanged"] = torch.equal(before.view(torch.uint8), after.view(torch.uint8))
    out["logits"] = after.tolist()
    out["pristine"] = logits(loadkit.Model(TARGET, device=DEVICE)).tolist()
print(json.dumps(out))
"""


class ChangingCheckpoint(unittest.TestCase):
    device = "cpu"

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="loadkit-changing-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run_scenario(self, scenario, how, fixture, journal=False, at_once=False):
        """Runs a scenario in a child; returns its JSON and the changed file's path."""
        directory, path, half = victim(fixture, os.path.join(self.tmp, "victim"))
        hook = f"{how}:{0 if at_once else half}:{path}"
        args = [MODEL["dir"], TARGET["dir"], MODEL["tokens"] if scenario == "load" else TARGET["tokens"],
                self.device, scenario, hook, directory, journal]
        child = harness.run_child(f"ARGS = {args!r}\n" + CHILD, timeout=300)
        self.assertIsNone(child.verdict(), "the Python process did not survive the change")
        return child.last_json(), path

    def assertClose(self, ours, fresh):
        """The logits of the version that was opened, as a fresh load of it gives them (fp32 bound)."""
        diff = (torch.tensor(ours) - torch.tensor(fresh)).abs().max().item()
        self.assertLessEqual(diff, harness.FP32_TOLERANCE)

    def assertNamesTheChange(self, out, path):
        self.assertIn("error", out, "no error although the file changed")
        self.assertIn(path, out["error"])
        self.assertIn(CHANGED, out["error"])

    def test_a_load_of_a_truncated_or_rewritten_file_is_an_input_error_naming_it(self):
        for how in ("truncate", "rewrite"):
            for at_once in (True, False):
                with self.subTest(how=how, at_once=at_once):
                    out, path = self.run_scenario("load", how, MODEL, at_once=at_once)
                    self.assertNamesTheChange(out, path)
                    shutil.rmtree(os.path.join(self.tmp, "victim"))

    def test_a_load_of_a_file_renamed_over_midway_reads_the_opened_version(self):
        out, path = self.run_scenario("load", "rename", MODEL)
        self.assertNotIn("error", out)
        with open(path, "rb") as changed, open(os.path.join(MODEL["dir"], os.path.basename(path)), "rb") as original:
            self.assertNotEqual(changed.read(), original.read(), "the hook did not replace the file")
        self.assertClose(out["logits"], out["pristine"])

    def test_a_reload_of_a_rewritten_file_says_the_weights_are_mixed_and_lists_what_it_wrote(self):
        out, path = self.run_scenario("reload", "rewrite", TARGET)
        self.assertNamesTheChange(out, path)
        self.assertIn(MIXED, out["error"])
        self.assertTrue(out["report"]["written_modules"], "plain layers are written as they are read")
        self.assertEqual(out["report"]["error"], out["error"])
        self.assertFalse(out["unchanged"])

    def test_a_reload_with_a_journal_leaves_the_model_bit_identical(self):
        for how in ("truncate", "rewrite"):
            with self.subTest(how=how):
                out, path = self.run_scenario("reload", how, TARGET, journal=True)
                self.assertNamesTheChange(out, path)
                self.assertNotIn(MIXED, out["error"])
                self.assertEqual(out["report"]["written_modules"], [])
                self.assertTrue(out["unchanged"], "the journal did not put the model back")
                shutil.rmtree(os.path.join(self.tmp, "victim"))

    def test_a_reload_of_a_file_renamed_over_midway_reads_the_opened_version(self):
        out, _ = self.run_scenario("reload", "rename", TARGET)
        self.assertNotIn("error", out)
        self.assertEqual(out["report"]["written_modules"], [])
        self.assertClose(out["logits"], out["pristine"])


@unittest.skipUnless(torch.cuda.is_available(), harness.CUDA_SKIP)
class ChangingCheckpointCuda(ChangingCheckpoint):
    device = "cuda"


if __name__ == "__main__":
    harness.main({"cpu": [ChangingCheckpoint], "cuda": [ChangingCheckpointCuda]})
