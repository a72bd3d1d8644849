#!/usr/bin/env python3
"""Load and reload throughput on a GPU, against baselines measured in the same run.

    load_bench.py --loadkit BUILD/bin/loadkit --work DIR [--layers N] [--repeats 3] [--out results.json]

Generates checkpoints A and B (bench/gen_checkpoint.py), warms the page
cache, then measures (min and median over repeats):
  - loadkit load (bf16) and reload A→B (bf16, fp8) from the page cache, from the
    --report JSON each command writes (peak extra device memory included);
  - safetensors load_file(device="cuda") and transformers from_pretrained(device_map="cuda");
  - a raw pinned host-to-device copy of the same byte count (the PCIe ceiling).
Prints a table and writes JSON. A benchmark, never a test: no pass/fail.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def checkpoint_bytes(d):
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors")))


def warm(d):
    for f in glob.glob(os.path.join(d, "*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def run_loadkit(args, cmd, env=None):
    with tempfile.NamedTemporaryFile(suffix=".json") as rep:
        subprocess.run([args.loadkit] + cmd + ["--report", rep.name, "--device", "cuda", "--log-level", "warn"],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
        return json.load(open(rep.name))


def summarize(name, nbytes, seconds, extra=None):
    out = {"name": name, "bytes": nbytes, "seconds_min": min(seconds), "seconds_median": statistics.median(seconds),
           "gb_per_s": nbytes / min(seconds) / 1e9}
    if extra:
        out.update(extra)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loadkit", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="load_bench.json")
    a = ap.parse_args()
    A, B = os.path.join(a.work, "a"), os.path.join(a.work, "b")
    for d, seed in ((A, 0), (B, 1)):
        subprocess.run([sys.executable, os.path.join(HERE, "gen_checkpoint.py"), d, "--layers", str(a.layers),
                        "--seed", str(seed)], check=True)
    nbytes = checkpoint_bytes(A)
    warm(A)
    warm(B)
    results = []

    # Ceiling: pinned host → device copy of the same byte count.
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(a.repeats):
        torch.cuda.synchronize(); t = time.perf_counter()
        dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    results.append(summarize("pinned_h2d_ceiling", nbytes, times))
    del host, dev

    from safetensors.torch import load_file
    times = []
    for _ in range(a.repeats):
        torch.cuda.synchronize(); t = time.perf_counter()
        tensors = {}
        for f in sorted(glob.glob(os.path.join(A, "*.safetensors"))):
            tensors.update(load_file(f, device="cuda"))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        del tensors
    results.append(summarize("safetensors_load_file_cuda", nbytes, times))
    torch.cuda.empty_cache()

    if not a.skip_transformers:
        from transformers import AutoModelForCausalLM
        times = []
        for _ in range(a.repeats):
            torch.cuda.synchronize(); t = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(A, dtype=torch.bfloat16, device_map="cuda")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            del m
            torch.cuda.empty_cache()
        results.append(summarize("transformers_from_pretrained_cuda", nbytes, times))

    # The staged path (default) and the plain mmap path (LOADKIT_STAGING=0) on the same files.
    runs = []
    for suffix, env in (("", {}), ("_mmap_path", {"LOADKIT_STAGING": "0"})):
        runs += [("loadkit_load_bf16" + suffix, ["load", "--model", A], env),
                 ("loadkit_reload_bf16" + suffix, ["reload", "--model", A, "--from", B], env),
                 ("loadkit_reload_fp8" + suffix, ["reload", "--model", A, "--from", B, "--quantization", "fp8"], env)]
    for label, cmd, env in runs:
        reports = [run_loadkit(a, cmd, env) for _ in range(a.repeats)]
        results.append(summarize(label, reports[0]["bytes"], [r["seconds"] for r in reports],
                                 {"peak_extra_device_bytes": max(r["peak_extra_device_bytes"] or 0 for r in reports),
                                  "pointers_stable": all(r["pointers_stable"] for r in reports)}))

    ceiling = results[0]["gb_per_s"]
    st = next(r for r in results if r["name"] == "safetensors_load_file_cuda")["gb_per_s"]
    for r in results:
        r["vs_ceiling"] = r["gb_per_s"] / ceiling
        r["vs_safetensors"] = r["gb_per_s"] / st
    out = {"device": torch.cuda.get_device_name(), "checkpoint_bytes": nbytes, "layers": a.layers, "results": results}
    json.dump(out, open(a.out, "w"), indent=2)
    print(f"{'what':36} {'GB/s':>8} {'min s':>8} {'x ceiling':>10} {'x safetensors':>14} {'peak extra MiB':>15}")
    for r in results:
        peak = r.get("peak_extra_device_bytes")
        print(f"{r['name']:36} {r['gb_per_s']:8.2f} {r['seconds_min']:8.3f} {r['vs_ceiling']:10.2f} "
              f"{r['vs_safetensors']:14.2f} {'' if peak is None else f'{peak / 2**20:15.1f}'}")


if __name__ == "__main__":
    main()
