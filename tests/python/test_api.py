#!/usr/bin/env python3
"""The package's surface (ctest python.api on the CPU, python.api_cuda on CUDA): version, the torch
it was built against, Model as a context manager and close(), typed signatures, plugins().

    test_api.py --device cpu|cuda [name patterns]
"""
import os
import re
import sys
import threading
import typing
import unittest

import harness

harness.skip_without_module()

import loadkit  # noqa: E402
import torch  # noqa: E402

FIXTURES = harness.fixtures()
HERE = os.path.dirname(os.path.abspath(__file__))
loadkit.set_log_level("warn")


def version_header():
    """MAJOR.MINOR.PATCH from sdk/include/loadkit/version.h, the one place the version lives."""
    text = open(os.path.join(HERE, "..", "..", "sdk", "include", "loadkit", "version.h")).read()
    parts = (re.search(rf"#define LOADKIT_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH"))
    return ".".join(parts)


class Package(unittest.TestCase):
    def test_version_is_the_sdk_headers(self):
        self.assertEqual(loadkit.__version__, version_header())

    def test_another_torch_major_minor_is_an_import_error_naming_both(self):
        built = loadkit._BUILT_AGAINST_TORCH
        self.assertEqual(built.split(".")[:2], torch.__version__.split("+")[0].split(".")[:2])
        child = harness.run_child("""
            import torch
            torch.__version__ = "1.99.3+cpu"
            try:
                import loadkit
            except ImportError as e:
                print(e)
            else:
                print("imported")
        """, 120)
        self.assertIsNone(child.verdict(), child.verdict())
        message = child.stdout.strip()
        self.assertIn("1.99.3+cpu", message)
        self.assertIn(built, message)

    def test_public_signatures_resolve_to_types(self):
        for function in (loadkit.Model.__init__, loadkit.Model.update, loadkit.Model.reload, loadkit.Model.logits,
                         loadkit.Model.sync_fsdp_shards, loadkit.plugins, loadkit.RankGroup.join):
            hints = typing.get_type_hints(function, vars(loadkit))
            self.assertIn("return", hints, function.__qualname__)
        self.assertTrue(os.path.isfile(os.path.join(os.path.dirname(loadkit.__file__), "py.typed")))
        for error in (loadkit.UsageError, loadkit.InputError, loadkit.PluginError):
            self.assertTrue(issubclass(error, loadkit.Error))

    def test_plugins_lists_what_the_cli_lists(self):
        found = {p["name"]: p for p in loadkit.plugins()}
        self.assertIn("LlamaForCausalLM", found["llama"]["architectures"])
        self.assertEqual(found["llama"]["status"], "ok")
        self.assertIn("fp8", [m for p in found.values() for m in p["quant_methods"]])
        self.assertEqual(found["llama"]["torch_version"].split(".")[:2], torch.__version__.split(".")[:2])


@unittest.skipUnless(loadkit.rank_backends()["cpu"], "this build has no Gloo (loadkit.rank_backends())")
class FsdpSyncOneRank(unittest.TestCase):
    """Model.sync_fsdp_shards through the bindings on a group of one rank (the shards are whole
    tensors), in a child that has torchrun's variables; examples/rl_sync runs it over two ranks."""

    def run_rank(self, script):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        f = FIXTURES["llama_fp32_gqa_sharded"]
        child = harness.run_child(f"PATH, TARGET, TOKENS = {f['dir']!r}, "
                                  f"{FIXTURES[f['reload_target']]['dir']!r}, {f['tokens']!r}\n" + script, 300, env=env)
        self.assertIsNone(child.verdict(), child.verdict())
        return child.stdout.strip().splitlines()[-1]

    def test_shards_of_one_rank_update_the_model_as_a_fresh_load_of_them(self):
        out = self.run_rank("""
import glob, torch, loadkit
from safetensors.torch import load_file
loadkit.set_log_level("warn")
state = {}
for f in glob.glob(TARGET + "/*.safetensors"):
    state.update(load_file(f))
with loadkit.RankGroup.join("cpu") as group, loadkit.Model(PATH) as model:
    assert (group.rank, group.size) == (0, 1)
    triples = [(n, t, list(t.shape)) for n, t in state.items()]
    report = model.sync_fsdp_shards(group, triples)
    assert report["tensors"] == len(state) and report["pointers_stable"], report
    assert torch.equal(model.logits(TOKENS), loadkit.Model(TARGET).logits(TOKENS))
    before = model.logits(TOKENS)
    bad = [("model.layers.0.mlp.nowhere.weight", torch.zeros(4, 4), [4, 4])] + triples
    try:
        model.sync_fsdp_shards(group, bad)
    except loadkit.InputError as e:
        assert "model.layers.0.mlp.nowhere.weight" in str(e), e
    else:
        raise AssertionError("an unknown tensor was accepted")
    assert torch.equal(model.logits(TOKENS), before)
    # A shard with no plain data, a 0-d plain tensor: refused by the ranks together, naming it.
    name = "model.norm.weight"
    for odd, what in [((name, state[name].to_sparse()), "layout Sparse"), ((name, torch.tensor(1.0)), "0-d")]:
        try:
            model.sync_fsdp_shards(group, [t for t in triples if t[0] != name] + [odd])
        except loadkit.InputError as e:
            assert name in str(e) and what in str(e), e
        else:
            raise AssertionError(f"a {what} shard was accepted")
        assert torch.equal(model.logits(TOKENS), before)
    try:
        model.sync_fsdp_shards(group, [(name, [1.0, 2.0])])
    except TypeError as e:
        assert name in str(e), e
    else:
        raise AssertionError("a list was taken for a tensor")
print("ok")
""")
        self.assertEqual(out, "ok")

    def test_join_without_torchrun_variables_is_a_usage_error(self):
        child = harness.run_child("""
            import os, loadkit
            os.environ.pop("WORLD_SIZE", None)
            try:
                loadkit.RankGroup.join("cpu")
            except loadkit.UsageError as e:
                print("usage error:", e)
        """, 120, env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
        self.assertIn("usage error:", child.stdout)
        self.assertIn("torchrun", child.stdout)


class Lifetime(unittest.TestCase):
    device = "cpu"
    name = "llama_fp32_gqa_sharded"

    def load(self, **kw):
        return loadkit.Model(FIXTURES[self.name]["dir"], device=self.device, **kw)

    def test_with_block_closes_the_model_and_later_calls_are_usage_errors(self):
        tokens = FIXTURES[self.name]["tokens"]
        with self.load() as model:
            self.assertEqual(model.logits(tokens).shape[0], len(tokens))
            self.assertFalse(model.closed)
        self.assertTrue(model.closed)
        self.assertEqual(repr(model), "<loadkit.Model (closed)>")
        for call in (lambda: model.logits(tokens), model.reload, model.begin_update, model.finish_update,
                     lambda: model.report, lambda: model.updating, lambda: model.plugin_search_path,
                     lambda: model.update({})):
            with self.assertRaises(loadkit.UsageError) as caught:
                call()
            self.assertIn("closed", str(caught.exception))
        model.close()  # again: nothing to do

    def test_with_block_closes_on_an_exception_too(self):
        with self.assertRaises(KeyError):
            with self.load() as model:
                raise KeyError("trainer failed")
        self.assertTrue(model.closed)

    def test_close_waits_for_a_call_in_progress_on_another_thread(self):
        model = self.load()
        target = FIXTURES[FIXTURES[self.name]["reload_target"]]["dir"]
        outcome = []

        def reload():
            try:
                outcome.append(model.reload(target))
            except loadkit.Error as e:
                outcome.append(e)

        reloading = threading.Thread(target=reload)
        reloading.start()
        model.close()
        reloading.join()
        self.assertTrue(model.closed)
        # The reload either ran to completion before close() or was refused after it; never cut off.
        if isinstance(outcome[0], dict):
            self.assertTrue(outcome[0]["pointers_stable"])
        else:
            self.assertIsInstance(outcome[0], loadkit.UsageError)
            self.assertIn("closed", str(outcome[0]))


class LifetimeCpu(Lifetime):
    device = "cpu"


@unittest.skipUnless(torch.cuda.is_available(), harness.CUDA_SKIP)
class LifetimeCuda(Lifetime):
    device = "cuda"

    def test_close_frees_the_device_memory(self):
        # loadkit allocates through torch's CUDA allocator: torch's counter sees its tensors. What
        # the model holds is freed by close(); what may stay is process-wide: cuBLAS keeps a
        # workspace per handle and stream (32 MiB on Hopper), taken here first by a matmul of ours.
        warm = torch.ones(64, 64, device="cuda")
        (warm @ warm).sum().item()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with self.load(dtype="float32") as model:
            model.logits(FIXTURES[self.name]["tokens"])
            torch.cuda.synchronize()
            loaded = torch.cuda.memory_allocated()
            weights = model.report["bytes"]
        torch.cuda.synchronize()
        closed = torch.cuda.memory_allocated()
        self.assertGreaterEqual(loaded - before, weights)
        self.assertGreaterEqual(loaded - closed, weights, "close() did not free the model's weights")
        self.assertLessEqual(closed - before, 16 << 20, "close() left more than workspaces allocated")


if __name__ == "__main__":
    harness.main({
        "cpu": [Package, FsdpSyncOneRank, LifetimeCpu],
        "cuda": [LifetimeCuda],
    })
