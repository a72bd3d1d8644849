"""loadkit: load a Hugging Face checkpoint into an inference engine's layout (vLLM's names and
shapes) through loadkit's plugins, and reload its weights in place, from disk or from a trainer's
tensors.

    import loadkit
    with loadkit.Model("path/to/checkpoint", device="cuda") as model:
        logits = model.logits([1, 2, 3])              # float32 [3, vocab] on the CPU
        optimizer.step()                              # a trainer's model, in Hugging Face naming
        model.update(hf_model.named_parameters())     # taken zero-copy, written in place
        model.reload("path/to/next-checkpoint")       # validated whole, then written in place

Failures raise loadkit.Error (UsageError, InputError, PluginError) with loadkit's one-line
message and the CLI's exit code as `.exit_code`.
"""
from __future__ import annotations

import atexit
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

# torch first: the extension links against the very libraries this torch loaded. (Its order
# against anything else is free: loadkit's binaries carry their own std::filesystem, see
# cmake/loadkitPrivateFilesystem.cmake.)
import torch

from ._build_info import TORCH_VERSION as _BUILT_AGAINST_TORCH
from ._build_info import GLOO as _GLOO
from ._build_info import NCCL as _NCCL
from ._build_info import __version__
from ._errors import Error, InputError, PluginError, UsageError


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


if _major_minor(torch.__version__) != _major_minor(_BUILT_AGAINST_TORCH):
    _want = ".".join(map(str, _major_minor(_BUILT_AGAINST_TORCH)))
    raise ImportError(f"loadkit {__version__} was built against torch {_BUILT_AGAINST_TORCH} and needs torch "
                      f"{_want}.x, but this environment has torch {torch.__version__}: install torch=={_want}.* or "
                      f"rebuild loadkit against this torch (pip install --no-build-isolation .)")

from . import _loadkit  # noqa: E402

# A thread inside a call when the interpreter exits must not come back into Python (see
# python/src/host_calls.h). Registered after torch's handlers, so it runs before them.
atexit.register(_loadkit._shutdown)
os.register_at_fork(after_in_child=_loadkit._after_fork_in_child)

__all__ = ["Model", "RankGroup", "plugins", "rank_backends", "set_log_level", "Error", "UsageError", "InputError", "PluginError",
           "__version__"]

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
NamedTensors = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
Report = dict[str, Any]


def rank_backends() -> dict[str, Optional[str]]:
    """The collective backend RankGroup uses on each device type in this build, None where the build
    has none (its headers were missing when it was built; RankGroup.join says so as a UsageError)."""
    return {"cpu": "gloo" if _GLOO else None, "cuda": "nccl" if _NCCL else None}


def set_log_level(level: str) -> None:
    """What loadkit logs to stderr: "trace", "debug", "info" (the default: one line a load or
    reload), "warn" or "error". UsageError for any other value."""
    _loadkit.set_log_level(level)


def plugins(plugin_dirs: Optional[Sequence[PathLike]] = None) -> list[dict[str, Any]]:
    """The plugins found in the search path (plugin_dirs first, then LOADKIT_PLUGIN_PATH, then the
    plugins installed with loadkit), as `loadkit plugins list` shows them: one dict per file with
    path, name, version, abi_version, sdk_version, torch_version, architectures, quant_methods and
    status ("ok", "broken: <reason>" or "shadowed by <file>")."""
    return _loadkit.plugins(_paths(plugin_dirs))


def _path(path: PathLike) -> bytes:
    """A path as the OS takes it: str (surrogate-escaped names from os.listdir included), bytes or
    os.PathLike."""
    return os.fsencode(path)


def _paths(paths: Optional[Sequence[PathLike]]) -> list[bytes]:
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("plugin_dirs takes a list of directories, not one path")
    return [_path(p) for p in (paths or [])]


def _name(name: object, what: str) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"{what}: a tensor name must be a str, got {type(name).__name__}")
    return name.encode("utf-8", "surrogateescape")


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return dtype


def _chunk(named_tensors: NamedTensors) -> list[tuple[bytes, torch.Tensor]]:
    """(name, tensor) pairs from a dict or an iterable of pairs, checked for their types."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    chunk = []
    for item in items:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise TypeError(f"update() takes (name, tensor) pairs or a dict, got an item {type(item).__name__}") \
                from None
        encoded = _name(name, "update()")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"update(): '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
        chunk.append((encoded, tensor))
    return chunk


class RankGroup:
    """This process's place among the ranks torchrun started: loadkit's own process group (Gloo on
    the CPU, NCCL on CUDA, one GPU per rank), for Model.sync_fsdp_shards.

    It is formed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT), next to the trainer's own torch.distributed group rather than on top of it:
    loadkit's collectives and its agreement between ranks (a rank that fails stops every rank with
    its message) never interleave with the trainer's. Under torchrun both use the launcher's store
    (loadkit's keys under "loadkit/"); where the trainer's rank 0 hosts the store on MASTER_PORT
    itself, give loadkit a port of its own with master_port.

    Collective: every rank calls join() at the same point. Collectives time out after
    LOADKIT_TP_TIMEOUT seconds (300).
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", master_port: Optional[int] = None) -> None:
        self._group = _loadkit.Group(str(device), master_port)

    @classmethod
    def join(cls, device: Union[str, torch.device] = "cpu", master_port: Optional[int] = None) -> RankGroup:
        """Joins the group (collective): the same as RankGroup(device, master_port)."""
        return cls(device, master_port)

    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def size(self) -> int:
        return self._group.size

    def close(self) -> None:
        """Leaves the group (every rank should, after its last sync)."""
        self._group.close()

    def __enter__(self) -> RankGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Model:
    """A model loaded by loadkit, in the inference engine's layout.

    Args:
        path: a Hugging Face checkpoint directory (config.json and safetensors), or sharded state
            with load_format="sharded"; str, bytes or os.PathLike (names that are not UTF-8, as
            os.listdir returns them, included).
        device: "cpu", "cuda", "cuda:N" or a torch.device.
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16" or a torch.dtype.
        quantization: "auto" (the checkpoint's own quantization_config, "none" for a 16-bit
            checkpoint), "none", "fp8", "int8" or a method a plugin provides.
        load_format: "auto", "safetensors", "sharded" or "dummy" (random weights).
        plugin_dirs: directories searched for plugins first; then LOADKIT_PLUGIN_PATH
            (colon-separated), then the plugins installed with loadkit (lib/loadkit/plugins next to
            libloadkit_runtime.so).
        tp_rank, tp_size: this process's tensor-parallel shard. Without a process group (not offered
            here) a model with tp_size > 1 can be loaded and updated, but not run.

    A context manager: `with loadkit.Model(...) as model:` closes it on exit, as close() does
    (device memory freed, plugins unloaded); any call after that raises UsageError.

    Threads: the GIL is released for every call, and calls on one model from several threads run
    one at a time (a `report` waits for a reload in progress, without holding the GIL). A thread
    still inside a call when the interpreter exits is let finish that call, then stopped.
    """

    def __init__(self, path: PathLike, device: Union[str, torch.device] = "cpu",
                 dtype: Union[str, torch.dtype] = "auto", quantization: str = "auto", load_format: str = "auto",
                 plugin_dirs: Optional[Sequence[PathLike]] = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        self._engine = _loadkit.Engine(_path(path), str(device), _dtype_name(dtype), quantization, load_format,
                                       _paths(plugin_dirs), tp_rank, tp_size)

    def logits(self, tokens: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
        """Logits of one sequence at positions 0..n-1, no KV cache.

        Args:
            tokens: token ids, a sequence of ints or a 1-D integer tensor.
        Returns:
            torch.Tensor, float32 [n, vocab_size] on the CPU.
        Raises:
            UsageError: no tokens, or a token outside the vocabulary.
        """
        if isinstance(tokens, torch.Tensor):
            if tokens.layout != torch.strided or tokens.is_meta or tokens.is_quantized or tokens.is_nested:
                kind = "meta" if tokens.is_meta else "quantized" if tokens.is_quantized else \
                    "nested" if tokens.is_nested else str(tokens.layout).removeprefix("torch.")
                raise TypeError(f"logits(): want a 1-D integer tensor with data, got a {kind} tensor")
            if tokens.dim() != 1 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
                raise TypeError(f"logits(): want a 1-D integer tensor, got {tokens.dim()}-D {tokens.dtype}")
            tokens = tokens.tolist()
        return self._engine.logits([operator.index(t) for t in tokens])

    def reload(self, path: Optional[PathLike] = None, process: bool = True, journal: bool = False) -> Report:
        """Reloads every weight in place, each kernel tensor keeping its storage.

        The whole checkpoint is validated first (names, shapes, dtypes, completeness); if that fails
        nothing is touched.

        A file truncated or rewritten while it is read raises InputError naming it ("changed while
        it was read"); a file renamed over the checkpoint meanwhile is fine (the version opened is
        read, consistently). When such a failure comes after layers were written: with `journal`
        the model is put back bit-identically; without, the error says the weights are now mixed
        and `report["written_modules"]` lists the layers already written.

        Args:
            path: checkpoint directory; None re-reads the model's own.
            process: False when the checkpoint is already in kernel format (the model's parameter
                names and shapes, e.g. sharded state): copied straight in.
            journal: keep a host copy of each layer before writing it, so that a failure puts the
                model back. Costs this rank's kernel bytes in host memory, for the reload only.
        Returns:
            the report (see `report`).
        """
        return self._engine.reload(b"" if path is None else _path(path), bool(process), bool(journal))

    def begin_update(self) -> None:
        """Starts a streaming update: update() calls then each add one chunk, finish_update() ends it.

        Raises:
            UsageError: an update is already in progress.
        """
        self._engine.begin_update()

    def update(self, named_tensors: NamedTensors) -> Optional[Report]:
        """Writes a trainer's tensors into the model, in place.

        Args:
            named_tensors: a dict or an iterable of (name, torch.Tensor) pairs in the checkpoint's
                (Hugging Face) naming, e.g. hf_model.named_parameters() or state_dict(); CPU or GPU,
                any floating dtype (converted while copied). The tensors are taken zero-copy (the
                same storage; requires_grad is fine, they are detached, not copied). A DTensor (a
                sharded parameter) is a TypeError: see sync_fsdp_shards.
        Returns:
            Outside begin_update()/finish_update(): the report of this whole update. Inside: None;
            the chunk is one part of the update.

        A chunk is validated whole before any of it is written: on failure (an unknown name, a shape
        or dtype that does not fit) it raises InputError and none of that chunk is applied; earlier
        chunks of a streaming update stay applied.

        A module whose weights are transformed after loading (quantization, fused layouts) keeps
        references to its tensors until its last weight has arrived (at the latest finish_update()):
        do not modify the tensors you passed (no optimizer step) before finish_update() returns.
        Modules that are not transformed are written before update() returns. loadkit keeps every
        tensor passed during a streaming update referenced until finish_update() returns, except
        those of a chunk refused with InputError, which it lets go before raising.

        Weights not given keep their values (a partial update is allowed), except that a transformed
        module given only part of its weights is an InputError at finish_update(), and left unchanged.
        """
        return self._engine.update(_chunk(named_tensors))

    def finish_update(self) -> Report:
        """Ends a streaming update: processes what was delayed and returns its report.

        Raises:
            UsageError: no update in progress.
            InputError: a transformed module received only part of its weights (it is left unchanged).
        """
        return self._engine.finish_update()

    def sync_fsdp_shards(self, group: RankGroup, shards: Iterable[Any], complete: bool = True) -> Report:
        """Updates the model from a trainer's FSDP-sharded weights; collective over `group`.

        Every rank of the group calls it with its own shards, in the same order, each holding this
        model (colocated: the trainer ranks are the processes that serve, at tensor-parallel size 1
        or the group's size). The ranks first compare their lists (names, full shapes, dtypes) and
        validate them against their models: any difference stops every rank with one line naming
        the tensor, before anything is gathered or written. Then they all-gather one layer at a time
        and update the model with it: the extra memory is one layer's full tensors.

        Args:
            group: RankGroup.join() on every rank, on this model's device type.
            shards: (name, DTensor) pairs as an FSDP2 model's named_parameters() gives them (one
                mesh dimension, Shard(0)), or (name, local_tensor, full_shape) triples with
                the row layout of FSDP2 and torch.chunk (uneven and empty shards allowed). A plain
                tensor in a pair is taken as whole on every rank (this rank's rows are passed).
            complete: every weight of the model must be in the list.
        Returns:
            the report of the update (see `report`).
        """
        rank, size = group.rank, group.size
        return self._engine.sync_fsdp_shards(group._group, [_shard(item, rank, size) for item in shards],
                                             bool(complete))

    @property
    def updating(self) -> bool:
        """True between begin_update() and finish_update()."""
        return self._engine.updating

    @property
    def report(self) -> Report:
        """The latest load, reload or update, as a dict: architecture, plugin, device, dtype,
        quantization, tensors, bytes (checkpoint bytes the model took in), bytes_read (of those, the
        bytes this process read from storage; 0 for an update), seconds, gb_per_s,
        peak_extra_device_bytes (CUDA only, else None), pointers_stable (every kernel tensor kept its
        storage), layers_processed, layers_delayed, untouched_modules (modules that received nothing),
        journal_bytes, chunks_by_plan and chunks_replayed (updates), reload_by_plan (the writes of
        the last reload of the same layout replayed, rebuilt modules' load format included) and
        reload_order_kept (modules rebuilt: the stream opened, before validation or a replay, in
        the last same-layout reload's order), stage_ms (the
        staged stream's stages, CUDA), and for a reload that failed: error (its message, else None) and
        written_modules (the layers it had written, now mixed with the others' previous weights;
        empty when the model is as before)."""
        return self._engine.report

    @property
    def plugin_search_path(self) -> list[str]:
        """The directories searched for plugins, in order (names as os.fsdecode gives them)."""
        return self._engine.plugin_search_path

    def close(self) -> None:
        """Frees the model (its device memory included) and unloads its plugins; waits for a call in
        progress on another thread. Idempotent; any other call afterwards raises UsageError."""
        self._engine.close()

    @property
    def closed(self) -> bool:
        return self._engine.closed

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<loadkit.Model (closed)>"
        r = self.report
        return f"<loadkit.Model {r['architecture']} on {r['device']}, {r['dtype']}, quantization {r['quantization']}>"


def _shard(item: Any, rank: int, size: int) -> tuple[bytes, torch.Tensor, list[int]]:
    """One FSDP shard as the extension takes it: (name, this rank's rows, full shape)."""
    if len(item) == 3:
        name, local, full_shape = item
        return _name(name, "sync_fsdp_shards()"), local, [int(d) for d in full_shape]
    name, tensor = item
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"sync_fsdp_shards(): '{name}' is a {type(tensor).__name__}, not a torch.Tensor")
    placements = getattr(tensor, "placements", None)
    if placements is None and (tensor.dim() == 0 or tensor.layout != torch.strided or tensor.is_nested):
        # No rows to take: passed whole, every rank refuses it together, naming it.
        return _name(name, "sync_fsdp_shards()"), tensor, []
    if placements is None:
        # Whole on every rank: this rank's rows as FSDP2 would shard them (ceil(rows / size) each,
        # the last ones shorter or empty).
        rows = tensor.shape[0]
        chunk = -(-rows // size)
        begin = min(rank * chunk, rows)
        return _name(name, "sync_fsdp_shards()"), tensor.narrow(0, begin, min(chunk, rows - begin)), list(tensor.shape)
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise TypeError(f"sync_fsdp_shards(): '{name}' is placed {placements}; want one mesh dimension, Shard(0)")
    return _name(name, "sync_fsdp_shards()"), tensor.to_local(), list(tensor.shape)
