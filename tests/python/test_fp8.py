#!/usr/bin/env python3
"""Pre-quantized fp8 checkpoints from Python (ctest python.fp8 on the CPU, python.fp8_cuda on CUDA):
quantization="auto" is the default and takes the checkpoint's own method; another method on an fp8
checkpoint is a UsageError; a trainer's bf16 tensors synced into a block-fp8 model are quantized as
they arrive, giving exactly a fresh load of those weights quantized offline by the fixture script's
reference quantizer (tests/fixtures/fp8_quant.py) — also for checkpoints that leave layers 16-bit,
per-tensor fp8 and compressed-tensors experts; a fused layer with some parts ignored is an InputError.

    test_fp8.py --device cpu|cuda [name patterns]
"""
import glob
import json
import os
import shutil
import tempfile
import unittest

import harness

harness.skip_without_module()

import loadkit  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FIXTURES = harness.fixtures()
loadkit.set_log_level("warn")


def tensors_of(directory, device):
    out = {}
    for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        out.update({k: v.to(device) for k, v in load_file(f).items()})
    return out


class BlockFp8(unittest.TestCase):
    device = "cpu"

    def load(self, name, **kw):
        return loadkit.Model(FIXTURES[name]["dir"], device=self.device, **kw)

    def test_auto_is_the_default_and_reads_the_checkpoint(self):
        with self.load("llama_blockfp8") as fp8, self.load("llama_blockfp8_bf16src") as bf16:
            self.assertEqual(fp8.report["quantization"], "fp8")
            self.assertEqual(bf16.report["quantization"], "none")

    def test_another_method_on_an_fp8_checkpoint_is_a_usage_error(self):
        with self.assertRaises(loadkit.UsageError) as caught:
            self.load("llama_blockfp8", quantization="int8")
        self.assertIn("already quantized", str(caught.exception))

    def test_bf16_update_equals_a_fresh_load_of_the_offline_quantization(self):
        for name in ("llama_blockfp8", "qwen3_moe_blockfp8"):
            with self.subTest(name):
                target = FIXTURES[name]["reload_target"]
                weights = tensors_of(FIXTURES[target]["dir"] + "_bf16src", self.device)
                tokens = FIXTURES[target]["tokens"]
                with self.load(name) as model, self.load(target) as fresh:
                    report = model.update(weights)
                    self.assertTrue(report["pointers_stable"])
                    self.assertTrue(torch.equal(model.logits(tokens), fresh.logits(tokens)))

    def test_checkpoints_as_they_ship_sync_from_bf16_as_the_offline_quantization(self):
        # Layers left 16-bit (block fp8, per-tensor fp8), per-tensor fp8, compressed-tensors experts.
        for name in ("llama_blockfp8_ignored", "llama_fp8_tensor", "qwen3_moe_ct_fp8_channel",
                     "qwen3_moe_ct_fp8_tensor"):
            with self.subTest(name):
                target = FIXTURES[name]["reload_target"]
                weights = tensors_of(FIXTURES[FIXTURES[target]["bf16_source"]]["dir"], self.device)
                tokens = FIXTURES[target]["tokens"]
                with self.load(name) as model, self.load(target) as fresh:
                    report = model.update(weights)
                    self.assertTrue(report["pointers_stable"])
                    self.assertTrue(torch.equal(model.logits(tokens), fresh.logits(tokens)))

    def test_a_fused_layer_with_some_parts_ignored_is_an_input_error(self):
        src = FIXTURES["llama_blockfp8_ignored"]["dir"]
        with tempfile.TemporaryDirectory() as tmp:
            dst = os.path.join(tmp, "edited")
            shutil.copytree(src, dst)
            with open(os.path.join(dst, "config.json")) as f:
                cfg = json.load(f)
            cfg["quantization_config"]["modules_to_not_convert"].append("model.layers.1.self_attn.v_proj")
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump(cfg, f)
            with self.assertRaises(loadkit.InputError) as caught:
                loadkit.Model(dst, device=self.device)
            self.assertIn("model.layers.1.self_attn.qkv_proj", str(caught.exception))


@unittest.skipUnless(torch.cuda.is_available(), harness.CUDA_SKIP)
class BlockFp8Cuda(BlockFp8):
    device = "cuda"


if __name__ == "__main__":
    harness.main({"cpu": [BlockFp8], "cuda": [BlockFp8Cuda]})
