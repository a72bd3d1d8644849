"""loadkit: load a Hugging Face checkpoint into an inference engine's layout (vLLM's names and
shapes) through loadkit's plugins, and reload its weights in place, from disk or from a trainer's
tensors.

    import loadkit
    model = loadkit.Model("path/to/checkpoint", device="cuda")
    logits = model.logits([1, 2, 3])              # float32 [3, vocab] on the CPU
    optimizer.step()                              # a trainer's model, in Hugging Face naming
    model.update(hf_model.named_parameters())     # taken zero-copy, written in place
    model.reload("path/to/next-checkpoint")       # validated whole, then written in place

Failures raise loadkit.Error (UsageError, InputError, PluginError) with loadkit's one-line
message and the CLI's exit code as `.exit_code`.
"""
import json
import operator
import os
import sys
from collections.abc import Mapping

# libtorch exports its own, older copy of std::filesystem. In a process that has not loaded
# libstdc++ before libtorch (python itself does not link it), our libraries' calls can bind to
# that copy and crash: seen on the GPU machine (Ubuntu 24.04, Python 3.12, built with gcc 13),
# where LD_PRELOAD=libstdc++.so.6 made its CUDA tests pass. Loading libstdc++ into the global scope
# before torch does the same; when torch is already imported it is too late (then preload it).
if "torch" not in sys.modules:
    import ctypes
    import ctypes.util

    _libstdcxx = ctypes.util.find_library("stdc++")
    if _libstdcxx:
        ctypes.CDLL(_libstdcxx, mode=ctypes.RTLD_GLOBAL)

# libtorch and libtorch_python first: the extension links against the very libraries this torch loaded.
import torch

from ._errors import Error, InputError, PluginError, UsageError
from . import _loadkit

__all__ = ["Model", "set_log_level", "Error", "UsageError", "InputError", "PluginError"]


def set_log_level(level):
    """What loadkit logs to stderr: "trace", "debug", "info" (the default: one line a load or
    reload), "warn" or "error". UsageError for any other value."""
    _loadkit.set_log_level(level)


def _dtype_name(dtype):
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return dtype


def _chunk(named_tensors):
    """(name, tensor) pairs from a dict or an iterable of pairs, checked for their types."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    chunk = []
    for item in items:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise TypeError(f"update() takes (name, tensor) pairs or a dict, got an item {type(item).__name__}") from None
        if not isinstance(name, str):
            raise TypeError(f"update(): a tensor name must be a str, got {type(name).__name__}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update(): '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        chunk.append((name, tensor))
    return chunk


class Model:
    """A model loaded by loadkit, in the inference engine's layout.

    Args:
        path: a Hugging Face checkpoint directory (config.json and safetensors), or sharded state
            with load_format="sharded".
        device: "cpu", "cuda", "cuda:N" or a torch.device.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16" or a torch.dtype.
        quantization: "none", "fp8", "int8" or a method a plugin provides.
        load_format: "auto", "safetensors", "sharded" or "dummy" (random weights).
        plugin_dirs: directories searched for plugins first; then LOADKIT_PLUGIN_PATH
            (colon-separated), then the plugins installed with loadkit (lib/loadkit/plugins next to
            libloadkit_runtime.so).
        tp_rank, tp_size: this process's tensor-parallel shard. Without a process group (not offered
            here) a model with tp_size > 1 can be loaded and updated, but not run.

    The GIL is released while loadkit loads, reloads, updates or computes logits; calls on one model
    from several threads run one at a time.
    """

    def __init__(self, path, device="cpu", dtype="auto", quantization="none", load_format="auto",
                 plugin_dirs=None, tp_rank=0, tp_size=1):
        dirs = [os.fspath(d) for d in (plugin_dirs or [])]
        self._engine = _loadkit.Engine(os.fspath(path), str(device), _dtype_name(dtype), quantization, load_format,
                                       dirs, tp_rank, tp_size)

    def logits(self, tokens):
        """Logits of one sequence at positions 0..n-1, no KV cache.

        Args:
            tokens: token ids, a sequence of ints or a 1-D integer tensor.
        Returns:
            torch.Tensor, float32 [n, vocab_size] on the CPU.
        Raises:
            UsageError: no tokens, or a token outside the vocabulary.
        """
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex():
                raise TypeError(f"logits(): want a 1-D integer tensor, got {tokens.dim()}-D {tokens.dtype}")
            tokens = tokens.tolist()
        return self._engine.logits([operator.index(t) for t in tokens])

    def reload(self, path=None, process=True):
        """Reloads every weight in place, each kernel tensor keeping its storage.

        The whole checkpoint is validated first (names, shapes, dtypes, completeness); if that fails
        nothing is touched.

        Args:
            path: checkpoint directory; None re-reads the model's own.
            process: False when the checkpoint is already in kernel format (the model's parameter
                names and shapes, e.g. sharded state): copied straight in.
        Returns:
            the report (see `report`).
        """
        return json.loads(self._engine.reload("" if path is None else os.fspath(path), bool(process)))

    def begin_update(self):
        """Starts a streaming update: update() calls then each add one chunk, finish_update() ends it.

        Raises:
            UsageError: an update is already in progress.
        """
        self._engine.begin_update()

    def update(self, named_tensors):
        """Writes a trainer's tensors into the model, in place.

        Args:
            named_tensors: a dict or an iterable of (name, torch.Tensor) pairs in the checkpoint's
                (Hugging Face) naming, e.g. hf_model.named_parameters() or state_dict(); CPU or GPU,
                any floating dtype (converted while copied). The tensors are taken zero-copy (the
                same storage; requires_grad is fine, they are detached, not copied).
        Returns:
            Outside begin_update()/finish_update(): the report of this whole update. Inside: None;
            the chunk is one part of the update.

        A chunk is validated whole before any of it is written: on failure (an unknown name, a shape
        or dtype that does not fit) it raises InputError and none of that chunk is applied; earlier
        chunks of a streaming update stay applied.

        A module whose weights are transformed after loading (quantization, fused layouts) keeps
        references to its tensors until its last weight has arrived (at the latest finish_update()):
        do not modify the tensors you passed (no optimizer step) before finish_update() returns.
        Modules that are not transformed are written before update() returns.

        Weights not given keep their values (a partial update is allowed), except that a transformed
        module given only part of its weights is an InputError at finish_update(), and left unchanged.
        """
        report = self._engine.update(_chunk(named_tensors))
        return None if report is None else json.loads(report)

    def finish_update(self):
        """Ends a streaming update: processes what was delayed and returns its report.

        Raises:
            UsageError: no update in progress.
            InputError: a transformed module received only part of its weights (it is left unchanged).
        """
        return json.loads(self._engine.finish_update())

    @property
    def updating(self):
        """True between begin_update() and finish_update()."""
        return self._engine.updating

    @property
    def report(self):
        """The latest load, reload or update, as a dict: architecture, plugin, device, dtype,
        quantization, tensors, bytes, seconds, gb_per_s, peak_extra_device_bytes (CUDA only, else
        None), pointers_stable (every kernel tensor kept its storage), layers_processed,
        layers_delayed, untouched_modules (modules that received nothing)."""
        return json.loads(self._engine.report)

    @property
    def plugin_search_path(self):
        """The directories searched for plugins, in order."""
        return list(self._engine.plugin_search_path)

    def __repr__(self):
        r = self.report
        return f"<loadkit.Model {r['architecture']} on {r['device']}, {r['dtype']}, quantization {r['quantization']}>"
