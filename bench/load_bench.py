#!/usr/bin/env python3
"""Load and reload throughput on a GPU, against baselines measured in the same run.

    load_bench.py --build BUILD --work DIR [--layers N] [--repeats 3] [--out DIR] [--sweep] [--cold]

Generates checkpoints A and B (bench/gen_checkpoint.py, Llama-3-8B shapes, bf16),
warms the page cache, then measures on the same files (min and median over repeats):
  - ceilings: a pinned host-to-device copy of the same byte count, the device-to-device
    copy rate, and a parallel raw read of the files (BUILD/bin/raw_probe: CUDA runtime and
    pread only, no torch);
  - baselines: safetensors load_file(device="cuda") and transformers
    from_pretrained(device_map="cuda");
  - loadkit load (a fresh `loadkit load` process each time: pinning included), staged
    and plain mmap path (LOADKIT_STAGING=0);
  - loadkit reload A<->B in one process (BUILD/bin/loadkit_bench: a long-lived engine),
    bf16 and fp8 online quantization, staged and mmap path, with peak extra device memory;
  - loadkit update from tensors already on the device (a colocated trainer's) against
    device-to-device copies of the same bytes;
  - with --cold (root): loadkit load and the raw parallel read after dropping the page cache,
    alternated;
  - with --sweep: the staged load over reader threads, piece size and ring depth.
Writes bench.json, a table (bench.txt) and, with matplotlib, bench.png under --out.
A benchmark, never a test: no pass/fail.
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


def files_of(d):
    return sorted(glob.glob(os.path.join(d, "*.safetensors")))


def warm(d):
    for f in files_of(d):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def drop_page_cache():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def summarize(name, nbytes, seconds, **extra):
    out = {"name": name, "bytes": nbytes, "seconds_min": min(seconds), "seconds_median": statistics.median(seconds),
           "gb_per_s": nbytes / min(seconds) / 1e9, "gb_per_s_median": nbytes / statistics.median(seconds) / 1e9}
    out.update(extra)
    return out


def cli_load(build, model, env=None, quant="none"):
    with tempfile.NamedTemporaryFile(suffix=".json") as rep:
        subprocess.run([os.path.join(build, "bin", "loadkit"), "load", "--model", model, "--device", "cuda",
                        "--quantization", quant, "--report", rep.name, "--log-level", "warn"],
                       check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
        return json.load(open(rep.name))


def bench_tool(build, args, env=None):
    out = subprocess.run([os.path.join(build, "bin", "loadkit_bench")] + args, check=True, capture_output=True,
                         text=True, env=dict(os.environ, **(env or {})))
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", required=True, help="the loadkit build directory")
    ap.add_argument("--work", required=True)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    A, B = os.path.join(a.work, "a"), os.path.join(a.work, "b")
    for d, seed in ((A, 0), (B, 1)):
        subprocess.run([sys.executable, os.path.join(HERE, "gen_checkpoint.py"), d, "--layers", str(a.layers),
                        "--seed", str(seed)], check=True)
    nbytes = checkpoint_bytes(A)
    warm(A)
    warm(B)
    results, extra = [], {}
    log = lambda *x: print(*x, flush=True)

    # Ceilings: the raw probe (pinned H2D, D2D, parallel read of the same files).
    probe = os.path.join(a.build, "bin", "raw_probe")
    if os.path.exists(probe):
        subprocess.run([probe, "--out", os.path.join(a.out, "raw_probe.json")] + files_of(A), check=True)
        extra["raw_probe"] = json.load(open(os.path.join(a.out, "raw_probe.json")))
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(a.repeats):
        torch.cuda.synchronize(); t = time.perf_counter()
        dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    results.append(summarize("pinned_h2d_ceiling", nbytes, times))
    del host, dev
    torch.cuda.empty_cache()
    if "raw_probe" in extra:
        reads = [r for r in extra["raw_probe"]["results"] if r["name"].startswith("page cache pread")]
        best = max(reads, key=lambda r: r["gb_per_s"])
        results.append(summarize("raw_parallel_read_page_cache", nbytes, [best["seconds"]], how=best["name"]))

    from safetensors.torch import load_file
    times = []
    for _ in range(a.repeats):
        torch.cuda.synchronize(); t = time.perf_counter()
        tensors = {}
        for f in files_of(A):
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
    log("baselines done")

    # loadkit load: a fresh process each time, staged and mmap path.
    for label, env in (("loadkit_load_bf16", {}), ("loadkit_load_bf16_mmap_path", {"LOADKIT_STAGING": "0"})):
        reps = [cli_load(a.build, A, env) for _ in range(a.repeats)]
        results.append(summarize(label, reps[0]["bytes"], [r["seconds"] for r in reps],
                                 peak_extra_device_bytes=max(r["peak_extra_device_bytes"] or 0 for r in reps)))
    # ... and in one process, load after load (staging memory pinned once).
    r = bench_tool(a.build, ["load", "--model", A, "--repeats", str(a.repeats + 1)])["load"]
    results.append(summarize("loadkit_load_bf16_in_process", r["bytes"], r["seconds"][1:]))
    log("loads done")

    # Reloads in one process (what a long-lived engine sees).
    for quant in ("none", "fp8"):
        for suffix, env in (("", {}), ("_mmap_path", {"LOADKIT_STAGING": "0"})):
            r = bench_tool(a.build, ["reload", "--model", A, "--from", B, "--quantization", quant,
                                     "--repeats", str(max(a.repeats, 3))], env)["reload"]
            label = f"loadkit_reload_{'bf16' if quant == 'none' else quant}{suffix}"
            results.append(summarize(label, r["bytes"], r["seconds"], peak_extra_device_bytes=r["peak_extra_device_bytes"],
                                     pointers_stable=r["pointers_stable"]))
    log("reloads done")

    # From tensors on the device (a colocated trainer's) against device-to-device copies.
    u = bench_tool(a.build, ["update", "--model", A, "--from", B, "--repeats", str(max(a.repeats, 3))])
    results.append(summarize("loadkit_update_from_device_bf16", u["update"]["bytes"], u["update"]["seconds"],
                             peak_extra_device_bytes=u["update"]["peak_extra_device_bytes"],
                             pointers_stable=u["update"]["pointers_stable"]))
    results.append(summarize("d2d_copy_per_tensor", u["d2d_copy_per_tensor"]["bytes"], u["d2d_copy_per_tensor"]["seconds"]))
    results.append(summarize("d2d_copy_one_block", u["d2d_copy_one_block"]["bytes"], u["d2d_copy_one_block"]["seconds"]))
    log("update done")

    if a.sweep:
        sweep = []
        for threads in (16, 24):
            for piece_kb in (1024, 2048, 4096):
                for depth in (2, 4):
                    env = {"LOADKIT_STAGING_THREADS": str(threads), "LOADKIT_STAGING_PIECE_KB": str(piece_kb),
                           "LOADKIT_STAGING_DEPTH": str(depth)}
                    reps = [cli_load(a.build, A, env) for _ in range(2)]
                    sweep.append(summarize(f"load t{threads} p{piece_kb}k d{depth}", reps[0]["bytes"],
                                           [r["seconds"] for r in reps]))
                    log(sweep[-1]["name"], round(sweep[-1]["gb_per_s"], 2))
        extra["sweep"] = sweep

    if a.cold:
        if not drop_page_cache():
            extra["cold"] = "skipped: cannot write /proc/sys/vm/drop_caches"
        else:
            cold_loads = []
            for _ in range(2):
                drop_page_cache()
                cold_loads.append(cli_load(a.build, A)["seconds"])
            results.append(summarize("loadkit_load_bf16_cold", nbytes, cold_loads))
            if os.path.exists(probe):
                subprocess.run([probe, "--cold-only", "--out", os.path.join(a.out, "raw_probe_cold.json")] + files_of(A),
                               check=True)
                cold = json.load(open(os.path.join(a.out, "raw_probe_cold.json")))["results"]
                best = max((r for r in cold if "pread" in r["name"]), key=lambda r: r["gb_per_s"])
                results.append(summarize("raw_parallel_read_cold", nbytes, [best["seconds"]], how=best["name"],
                                         all=[(r["name"], round(r["gb_per_s"], 2)) for r in cold]))
            warm(A)
        log("cold done")

    by = {r["name"]: r for r in results}
    ceiling = by["pinned_h2d_ceiling"]["gb_per_s"]
    st = by["safetensors_load_file_cuda"]["gb_per_s"]
    for r in results:
        r["vs_ceiling"] = r["gb_per_s"] / ceiling
        r["vs_safetensors"] = r["gb_per_s"] / st
    ratios = {}
    if "loadkit_reload_fp8" in by:
        ratios["fp8_reload_vs_bf16_reload"] = by["loadkit_reload_fp8"]["gb_per_s"] / by["loadkit_reload_bf16"]["gb_per_s"]
    ratios["update_vs_d2d_one_block"] = by["loadkit_update_from_device_bf16"]["gb_per_s"] / by["d2d_copy_one_block"]["gb_per_s"]
    ratios["update_vs_d2d_per_tensor"] = by["loadkit_update_from_device_bf16"]["gb_per_s"] / by["d2d_copy_per_tensor"]["gb_per_s"]
    if "loadkit_load_bf16_cold" in by and "raw_parallel_read_cold" in by:
        ratios["cold_load_vs_raw_read"] = by["loadkit_load_bf16_cold"]["gb_per_s"] / by["raw_parallel_read_cold"]["gb_per_s"]
    out = {"device": torch.cuda.get_device_name(), "checkpoint_bytes": nbytes, "layers": a.layers, "results": results,
           "ratios": ratios, **extra}
    json.dump(out, open(os.path.join(a.out, "bench.json"), "w"), indent=2)
    lines = [f"device {out['device']}, checkpoint {nbytes / 1e9:.2f} GB ({a.layers} layers of Llama-3-8B shapes, bf16)",
             f"{'what':38} {'GB/s':>8} {'min s':>8} {'x ceiling':>10} {'x safetensors':>14} {'peak extra MiB':>15}"]
    for r in results:
        peak = r.get("peak_extra_device_bytes")
        lines.append(f"{r['name']:38} {r['gb_per_s']:8.2f} {r['seconds_min']:8.4f} {r['vs_ceiling']:10.2f} "
                     f"{r['vs_safetensors']:14.2f} {'' if peak is None else f'{peak / 2**20:15.1f}'}")
    lines += [f"{k}: {v:.3f}" for k, v in ratios.items()]
    open(os.path.join(a.out, "bench.txt"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(results) + 1))
        ax.barh([r["name"] for r in results][::-1], [r["gb_per_s"] for r in results][::-1])
        ax.set_xlabel("GB/s")
        ax.set_xscale("log")
        ax.set_title(f"{out['device']}: {nbytes / 1e9:.2f} GB bf16 checkpoint")
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "bench.png"), dpi=90)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
