#!/usr/bin/env python3
"""Loads a checkpoint onto the GPU with another loader, in this (fresh) process, and times it.

    peers.py PEER MODEL_DIR [--repeats 3]

PEER: instanttensor | fastsafetensors | runai | safetensors | transformers. Each repeat loads
every tensor of MODEL_DIR's *.safetensors onto cuda:0 and holds them all until the device is
idle (transformers: the whole model); the first repeat is what a fresh process pays (CUDA is
initialised before the clock starts, as for `loadkit load`), the others what a process that
loaded before pays. Prints one JSON object: {"peer", "seconds": [...], "bytes", "tensors"},
or {"peer", "missing": why} when the package is not importable, or {"peer", "failed": why}.
A benchmark, never a test.
"""
import argparse
import glob
import json
import os
import sys
import time


def files_of(d):
    return sorted(glob.glob(os.path.join(d, "*.safetensors")))


def instanttensor_load(model_dir):
    import instanttensor
    out = {}
    with instanttensor.safe_open(files_of(model_dir), framework="pt", device=0) as f:
        for name, t in f.tensors():
            out[name] = t
    return out


def fastsafetensors_load(model_dir):
    import fastsafetensors
    with fastsafetensors.fastsafe_open(files_of(model_dir), device="cuda:0", nogds=True) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # the tensors keep their buffers alive


def runai_load(model_dir):
    from runai_model_streamer import SafetensorsStreamer
    out = {}
    with SafetensorsStreamer() as s:
        s.stream_files(files_of(model_dir), device="cuda")
        for name, t in s.get_tensors():
            out[name] = t if t.is_cuda else t.to("cuda")  # counted on the GPU, wherever it streams to
    return out


def safetensors_load(model_dir):
    from safetensors.torch import load_file
    out = {}
    for f in files_of(model_dir):
        out.update(load_file(f, device="cuda"))
    return out


def transformers_load(model_dir):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    return dict(model.state_dict())


PEERS = {"instanttensor": ("instanttensor", instanttensor_load),
         "fastsafetensors": ("fastsafetensors", fastsafetensors_load),
         "runai": ("runai_model_streamer", runai_load),
         "safetensors": ("safetensors", safetensors_load),
         "transformers": ("transformers", transformers_load)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("model")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    module, load = PEERS[a.peer]
    out = {"peer": a.peer}
    try:
        __import__(module)
    except Exception as e:  # not installed, or its extension does not load here
        out["missing"] = f"cannot import {module}: {type(e).__name__}: {e}"
        print(json.dumps(out))
        return
    try:
        import torch
        from safetensors import safe_open
        torch.empty(1, device="cuda")  # CUDA context up before the clock, as loadkit's own load does
        expected = set()
        for f in files_of(a.model):
            with safe_open(f, "pt") as h:
                expected.update(h.keys())
        seconds = []
        for _ in range(a.repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            tensors = load(a.model)
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
            if a.peer != "transformers":  # transformers renames and stacks; the others must give every tensor
                missing = expected - set(tensors)
                if missing or any(not t.is_cuda for t in tensors.values()):
                    raise RuntimeError(f"{len(missing)} tensors missing or not on the GPU")
                out["tensors"] = len(tensors)
                out["bytes"] = sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
            torch.cuda.empty_cache()
        out["seconds"] = seconds
    except Exception as e:
        out["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
