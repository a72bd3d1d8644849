#!/usr/bin/env python3
"""`import loadkit` as a trainer uses it (ctest python.module on the CPU, python.module_cuda on CUDA).

    test_module.py --device cpu|cuda [unittest args]

Environment: PYTHONPATH=<build>/python, LOADKIT_FIXTURES=<build>/fixtures, LOADKIT_BUILD_DIR=<build>
and LOADKIT_CMAKE (the install test), LOADKIT_PYTHON_MODULE_MISSING (the reason, when CMake could not
build the module). Exits 77 (ctest: skipped) when every test was skipped, printing why; a test skipped among
others shows as "skipped '<reason>'" in the log.

References are independent of loadkit: transformers' logits of the same (updated) model, and a fresh
loadkit load of the updated weights saved by transformers.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import unittest

import harness

harness.skip_without_module()

import loadkit  # noqa: E402  (first: it must not break torch or transformers imported after it)
import torch  # noqa: E402
import transformers  # noqa: E402

FIXTURES = harness.fixtures()
CUDA_SKIP = harness.CUDA_SKIP
FP32_TOLERANCE = harness.FP32_TOLERANCE


def hf_model(name, device):
    """The fixture through transformers, fp32, eager attention (honours every config flag)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES[name]["dir"], dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.to(device).eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens], device=model.device)).logits[0].float().cpu()


def optimizer_step(model, tokens):
    """One real training step: next-token loss on `tokens`, backward, AdamW with weight decay,
    so that every weight changes (decay moves even the embedding rows no token used)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.tensor([tokens], device=model.device)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def max_diff(a, b):
    return (a - b).abs().max().item()


class DeviceCase(unittest.TestCase):
    device = "cpu"

    def load(self, name, **kw):
        return loadkit.Model(FIXTURES[name]["dir"], device=self.device, **kw)

    def tokens(self, name):
        return FIXTURES[name]["tokens"]

    def trained(self, name):
        """transformers' model of fixture `name` after one optimizer step, and its weights before it."""
        hf = hf_model(name, self.device)
        before = {n: p.detach().clone() for n, p in hf.named_parameters()}
        optimizer_step(hf, self.tokens(name))
        for n, p in hf.named_parameters():
            self.assertFalse(torch.equal(before[n], p.detach()), f"the step left {n} unchanged")
        return hf

    def saved(self, hf):
        """`hf` written by transformers' save_pretrained into a temporary directory."""
        out = tempfile.mkdtemp(prefix="loadkit-py-")
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        hf.save_pretrained(out)
        return out


# ------------------------------------------------------------------------------------ trainer updates


class TrainerUpdate(DeviceCase):
    def check_update_after_optimizer_step(self, name):
        model = self.load(name)
        tokens = self.tokens(name)
        hf = hf_model(name, self.device)
        before = model.logits(tokens)
        self.assertLessEqual(max_diff(before, hf_logits(hf, tokens)), FP32_TOLERANCE)
        optimizer_step(hf, tokens)

        report = model.update(hf.named_parameters())

        expected = hf_logits(hf, tokens)
        after = model.logits(tokens)
        self.assertLessEqual(max_diff(after, expected), FP32_TOLERANCE)
        self.assertGreater(max_diff(after, before), 100 * FP32_TOLERANCE, "the update changed nothing")
        self.assertTrue(report["pointers_stable"])
        self.assertEqual(report["untouched_modules"], [])
        self.assertEqual(report["tensors"], len(list(hf.named_parameters())))

    def test_update_from_named_parameters_after_an_optimizer_step_llama(self):
        self.check_update_after_optimizer_step("llama_fp32_gqa_sharded")

    def test_update_from_named_parameters_after_an_optimizer_step_qwen2_tied(self):
        # Tied embeddings: named_parameters() names the shared tensor once, as model.embed_tokens.
        self.check_update_after_optimizer_step("qwen2_fp32_window_mqa_tied")

    def test_update_from_named_parameters_after_an_optimizer_step_gpt2(self):
        # transformer.h.N.attn.c_attn.weight: Conv1D [in, out], fused q/k/v, other names than vLLM's.
        self.check_update_after_optimizer_step("gpt2_fp32_prefixed")

    def test_chunked_update_in_shuffled_order_equals_a_fresh_load(self):
        name = "llama_fp32_gqa_sharded"
        model = self.load(name)
        hf = self.trained(name)
        pairs = list(hf.state_dict().items())
        random.Random(9).shuffle(pairs)

        model.begin_update()
        self.assertTrue(model.updating)
        for i in range(0, len(pairs), 3):
            self.assertIsNone(model.update(dict(pairs[i:i + 3])))
        report = model.finish_update()
        self.assertFalse(model.updating)

        fresh = loadkit.Model(self.saved(hf), device=self.device)
        tokens = self.tokens(name)
        self.assertTrue(torch.equal(model.logits(tokens), fresh.logits(tokens)))
        self.assertLessEqual(max_diff(model.logits(tokens), hf_logits(hf, tokens)), FP32_TOLERANCE)
        self.assertTrue(report["pointers_stable"])
        self.assertEqual(report["tensors"], len(pairs))
        self.assertEqual(report["bytes"], sum(t.nbytes for _, t in pairs))
        self.assertEqual(report["bytes_read"], 0)  # a trainer's tensors: nothing read from storage
        self.assertEqual(report["untouched_modules"], [])

    def test_update_takes_the_callers_storage_not_a_copy(self):
        # With int8, qkv_proj is rebuilt from its load format once q, k and v have all arrived: until
        # then loadkit holds the tensors it was given. A q_proj changed in place after update() returned
        # must therefore show in the result, exactly as if the changed values had been passed; a copy
        # taken by update() would give the unchanged result instead.
        name = "llama_fp32_gqa_sharded"
        q = "model.layers.0.self_attn.q_proj.weight"
        state = {n: t.detach().clone() for n, t in self.trained(name).state_dict().items()}
        rest = {n: t for n, t in state.items() if n != q}
        passed = state[q].clone()
        unchanged = state[q].clone()

        model = self.load(name, quantization="int8")
        model.begin_update()
        model.update([(q, passed)])
        passed.mul_(0.5)  # after update() returned, before its module is complete
        model.update(rest)
        model.finish_update()

        as_changed = self.load(name, quantization="int8")
        as_changed.update(dict(rest, **{q: passed}))
        as_given = self.load(name, quantization="int8")
        as_given.update(dict(rest, **{q: unchanged}))
        tokens = self.tokens(name)
        self.assertTrue(torch.equal(model.logits(tokens), as_changed.logits(tokens)))
        self.assertFalse(torch.equal(model.logits(tokens), as_given.logits(tokens)))


class TrainerUpdateCpu(TrainerUpdate):
    device = "cpu"


@unittest.skipUnless(torch.cuda.is_available(), CUDA_SKIP)
class TrainerUpdateCuda(TrainerUpdate):
    device = "cuda"

    def test_update_from_gpu_tensors_takes_no_device_memory(self):
        # Plain (unquantized) modules are written straight from the caller's GPU tensors into the
        # kernel tensors: no staging copy of any of them on the device.
        name = "llama_fp32_gqa_sharded"
        model = self.load(name)
        hf = self.trained(name)
        report = model.update(hf.named_parameters())
        self.assertTrue(report["device"].startswith("cuda"))
        self.assertEqual(report["peak_extra_device_bytes"], 0)


# ------------------------------------------------------------------------------------- loading, reload


class Loading(DeviceCase):
    def test_logits_equal_transformers_reference(self):
        f = FIXTURES["llama_fp32_gqa_sharded"]
        from safetensors.torch import load_file
        reference = load_file(f["reference"])
        model = self.load(f["name"], dtype=torch.float32)
        logits = model.logits(reference["tokens"])  # a 1-D int64 tensor
        self.assertEqual(logits.dtype, torch.float32)
        self.assertEqual(logits.device.type, "cpu")
        self.assertEqual(tuple(logits.shape), (len(f["tokens"]), f["vocab_size"]))
        self.assertLessEqual(max_diff(logits, reference["logits"]), FP32_TOLERANCE)
        self.assertTrue(torch.equal(logits, model.logits(f["tokens"])))  # a list of ints

    def test_reload_from_a_second_checkpoint_equals_a_fresh_load(self):
        f = FIXTURES["llama_fp32_gqa_sharded"]
        target = FIXTURES[f["reload_target"]]
        model = self.load(f["name"])
        before = model.logits(f["tokens"])

        report = model.reload(target["dir"])

        fresh = loadkit.Model(target["dir"], device=self.device)
        self.assertTrue(torch.equal(model.logits(f["tokens"]), fresh.logits(f["tokens"])))
        self.assertFalse(torch.equal(model.logits(f["tokens"]), before))
        self.assertEqual(report, model.report)
        self.assertEqual(report["architecture"], "LlamaForCausalLM")
        self.assertEqual(report["dtype"], "float32")
        self.assertEqual(report["quantization"], "none")
        self.assertTrue(report["device"].startswith(self.device))
        self.assertTrue(report["pointers_stable"])
        self.assertEqual(report["untouched_modules"], [])
        self.assertGreater(report["layers_processed"], 0)
        self.assertGreaterEqual(report["layers_delayed"], 0)
        self.assertEqual(report["bytes"], fresh.report["bytes"])
        self.assertGreater(report["bytes"], 0)
        self.assertEqual(report["bytes_read"], report["bytes"])  # one rank reads all it takes in
        self.assertGreater(report["seconds"], 0)
        self.assertAlmostEqual(report["gb_per_s"], report["bytes"] / report["seconds"] / 1e9, places=6)
        if self.device == "cpu":
            self.assertIsNone(report["peak_extra_device_bytes"])
        else:
            self.assertGreaterEqual(report["peak_extra_device_bytes"], 0)

        model.reload()  # its own checkpoint again
        self.assertTrue(torch.equal(model.logits(f["tokens"]), before))


class LoadingCpu(Loading):
    device = "cpu"

    def test_default_plugins_are_found_next_to_the_runtime_library(self):
        model = self.load("llama_fp32_gqa_sharded", plugin_dirs=["/nonexistent/plugins"])
        path = model.plugin_search_path
        self.assertEqual(path[0], "/nonexistent/plugins")
        build = os.environ["LOADKIT_BUILD_DIR"]
        self.assertEqual(os.path.realpath(path[-1]), os.path.realpath(os.path.join(build, "lib", "loadkit", "plugins")))
        self.assertEqual(os.path.realpath(os.path.dirname(model.report["plugin"])), os.path.realpath(path[-1]))


@unittest.skipUnless(torch.cuda.is_available(), CUDA_SKIP)
class LoadingCuda(Loading):
    device = "cuda"


# ------------------------------------------------------------------------------------------ errors


class Errors(DeviceCase):
    name = "llama_fp32_gqa_sharded"

    def assertOneLine(self, error):
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertNotIn("Exception raised from", message)
        return message

    def test_unknown_tensor_name_is_an_input_error_naming_it_and_changes_nothing(self):
        model = self.load(self.name)
        before = model.logits(self.tokens(self.name))
        state = dict(self.trained(self.name).named_parameters())
        state["model.layers.1.mlp.surprise.weight"] = torch.zeros(3)
        with self.assertRaises(loadkit.InputError) as caught:
            model.update(state)
        self.assertIn("model.layers.1.mlp.surprise.weight", self.assertOneLine(caught.exception))
        self.assertEqual(caught.exception.exit_code, 3)
        self.assertFalse(model.updating)
        self.assertTrue(torch.equal(model.logits(self.tokens(self.name)), before))

    def test_wrong_shape_is_an_input_error_naming_it_and_changes_nothing(self):
        model = self.load(self.name)
        before = model.logits(self.tokens(self.name))
        state = dict(self.trained(self.name).named_parameters())
        name = "model.layers.2.mlp.down_proj.weight"
        state[name] = state[name][:, :-1]
        with self.assertRaises(loadkit.InputError) as caught:
            model.update(state)
        self.assertIn(name, self.assertOneLine(caught.exception))
        self.assertTrue(torch.equal(model.logits(self.tokens(self.name)), before))

    def test_bad_chunk_of_a_streaming_update_is_rejected_whole_and_the_update_goes_on(self):
        model = self.load(self.name)
        hf = self.trained(self.name)
        state = dict(hf.named_parameters())
        model.begin_update()
        with self.assertRaises(loadkit.InputError):
            model.update({"model.norm.weight": state["model.norm.weight"], "model.nowhere.weight": torch.zeros(1)})
        self.assertTrue(model.updating)
        model.update(state)  # model.norm.weight was not applied above: no "given twice"
        model.finish_update()
        fresh = loadkit.Model(self.saved(hf), device=self.device)
        self.assertTrue(torch.equal(model.logits(self.tokens(self.name)), fresh.logits(self.tokens(self.name))))

    def test_tensors_without_plain_data_are_input_errors_naming_them_and_change_nothing(self):
        # torch would refuse each only at its copy, after the tensors before it were written.
        model = self.load(self.name)
        before = model.logits(self.tokens(self.name))
        hf = self.trained(self.name)
        state = {k: v.detach() for k, v in hf.named_parameters()}
        name = "model.norm.weight"
        kinds = {
            "a meta tensor": lambda t: torch.empty_like(t, device="meta"),
            "layout Sparse": lambda t: t.to_sparse(),
            "a quantized tensor": lambda t: torch.quantize_per_tensor(t.float().cpu(), 0.1, 0, torch.qint8),
            "a nested tensor": lambda t: torch.nested.nested_tensor([t, t]),
            "a wrapper tensor": lambda t: torch._to_functional_tensor(t.clone()),
        }
        for what, make in kinds.items():
            with self.subTest(what):
                bad = dict(state)
                bad.pop(name)
                bad[name] = make(state[name])  # last: every other tensor comes before it
                with self.assertRaises(loadkit.InputError) as caught:
                    model.update(bad)
                message = self.assertOneLine(caught.exception)
                self.assertIn(f"'{name}' is ", message)
                self.assertIn(what, message)
                self.assertFalse(model.updating)
                self.assertTrue(torch.equal(model.logits(self.tokens(self.name)), before))
        model.begin_update()  # streamed: the chunk is rejected whole and the update goes on
        with self.assertRaises(loadkit.InputError):
            model.update({"model.embed_tokens.weight": state["model.embed_tokens.weight"],
                          name: state[name].to_sparse()})
        self.assertTrue(model.updating)
        model.update(state)
        model.finish_update()
        fresh = loadkit.Model(self.saved(hf), device=self.device)
        self.assertTrue(torch.equal(model.logits(self.tokens(self.name)), fresh.logits(self.tokens(self.name))))

    def test_missing_directory_is_an_input_error_naming_it(self):
        with self.assertRaises(loadkit.InputError) as caught:
            loadkit.Model("/nonexistent/checkpoint")
        self.assertIn("/nonexistent/checkpoint", self.assertOneLine(caught.exception))
        self.assertIsInstance(caught.exception, loadkit.Error)

    def test_unknown_quantization_is_a_plugin_error_naming_it(self):
        with self.assertRaises(loadkit.PluginError) as caught:
            self.load(self.name, quantization="int3")
        self.assertIn("int3", self.assertOneLine(caught.exception))
        self.assertEqual(caught.exception.exit_code, 4)

    def test_architecture_no_plugin_serves_is_a_plugin_error_naming_it(self):
        out = tempfile.mkdtemp(prefix="loadkit-py-")
        self.addCleanup(shutil.rmtree, out, ignore_errors=True)
        source = FIXTURES[self.name]["dir"]
        for f in os.listdir(source):
            if f != "config.json":
                os.symlink(os.path.join(source, f), os.path.join(out, f))
        config = json.load(open(os.path.join(source, "config.json")))
        config["architectures"] = ["NoSuchForCausalLM"]
        json.dump(config, open(os.path.join(out, "config.json"), "w"))
        with self.assertRaises(loadkit.PluginError) as caught:
            loadkit.Model(out)
        self.assertIn("NoSuchForCausalLM", self.assertOneLine(caught.exception))

    def test_bad_option_and_token_values_are_usage_errors(self):
        with self.assertRaises(loadkit.UsageError) as caught:
            self.load(self.name, dtype="float8")
        self.assertIn("float8", self.assertOneLine(caught.exception))
        model = self.load(self.name)
        with self.assertRaises(ValueError) as caught:  # UsageError is a ValueError
            model.logits([0, FIXTURES[self.name]["vocab_size"]])
        self.assertIsInstance(caught.exception, loadkit.UsageError)
        self.assertEqual(caught.exception.exit_code, 2)
        with self.assertRaises(loadkit.UsageError):
            model.finish_update()
        with self.assertRaises(loadkit.UsageError) as caught:
            loadkit.set_log_level("loud")
        self.assertIn("loud", str(caught.exception))

    def test_non_tensors_are_type_errors(self):
        model = self.load(self.name)
        with self.assertRaises(TypeError) as caught:
            model.update({"model.norm.weight": [1.0, 2.0]})
        self.assertIn("model.norm.weight", str(caught.exception))
        with self.assertRaises(TypeError):
            model.logits(torch.ones(3))
        for tokens in (torch.tensor([1, 2]).to_sparse(), torch.ones(2, dtype=torch.long, device="meta"),
                       torch.tensor([True, False])):
            with self.subTest(tokens=tokens.layout if tokens.is_sparse else tokens.device if tokens.is_meta else tokens.dtype):
                with self.assertRaises(TypeError) as caught:
                    model.logits(tokens)
                self.assertIn("1-D integer tensor", str(caught.exception))


# --------------------------------------------------------------------------------------- installed


class Installed(unittest.TestCase):
    def test_installed_module_finds_its_plugins_and_lives_with_transformers(self):
        build = os.environ["LOADKIT_BUILD_DIR"]
        prefix = tempfile.mkdtemp(prefix="loadkit-py-install-")
        self.addCleanup(shutil.rmtree, prefix, ignore_errors=True)
        cmake = os.environ.get("LOADKIT_CMAKE", "cmake")
        subprocess.run([cmake, "--install", build, "--prefix", prefix], check=True, stdout=subprocess.DEVNULL)
        version = sysconfig.get_python_version()
        site = os.path.join(prefix, "lib", f"python{version}", "site-packages")
        self.assertTrue(os.path.isfile(os.path.join(site, "loadkit", "__init__.py")))
        fixture = FIXTURES["gpt2_fp32_prefixed"]
        checkpoint, tokens = fixture["dir"], fixture["tokens"]
        # A fresh interpreter: loadkit imported first, transformers after it; no plugin directory given.
        script = textwrap.dedent(f"""
            import loadkit, os, sys, torch, transformers
            assert loadkit.__file__.startswith({site!r}), loadkit.__file__
            loadkit.set_log_level("warn")
            model = loadkit.Model({checkpoint!r})
            assert model.plugin_search_path[-1].startswith({prefix!r}), model.plugin_search_path
            assert model.report["plugin"].startswith({prefix!r}), model.report["plugin"]
            hf = transformers.AutoModelForCausalLM.from_pretrained({checkpoint!r}, attn_implementation="eager")
            with torch.no_grad():
                expected = hf(torch.tensor([{tokens!r}])).logits[0]
            diff = (model.logits({tokens!r}) - expected).abs().max().item()
            assert diff <= {FP32_TOLERANCE}, diff
            print("ok", diff)
        """)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOADKIT_PLUGIN_PATH")}
        env["PYTHONPATH"] = site
        run = subprocess.run([sys.executable, "-c", script], env=env, cwd=prefix, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.assertEqual(run.returncode, 0, run.stdout)
        self.assertEqual(run.stdout.splitlines()[-1].split()[0], "ok", run.stdout)
        self.assertNotIn("[info]", run.stdout)  # set_log_level("warn") silenced the load's line


if __name__ == "__main__":
    harness.main({
        "cpu": [TrainerUpdateCpu, LoadingCpu, Errors, Installed],
        "cuda": [TrainerUpdateCuda, LoadingCuda],
    })
