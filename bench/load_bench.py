#!/usr/bin/env python3
"""Load, reload and update throughput on a GPU, dense and MoE, against ceilings and other
loaders measured in the same run.

    load_bench.py --build BUILD --work DIR --out DIR [--shapes moe,dense32,many,dense8,qwen3moe,v3]
                  [--rows probe,load,reload,update,blockfp8,peers] [--peers LIST] [--repeats 3]
                  [--budget-s 500] [--plain-path] [--cold] [--sweep] [--smoke]
    load_bench.py --report-only bench.json --out DIR      (the tables and plot again)

Shapes (bench/gen_checkpoint.py, bf16 random values; checkpoints A and B of the same shapes):
  dense8   Llama-3-8B shapes, 8 layers (5.59 GB, 75 tensors)
  dense32  Llama-3-8B shapes, 32 layers (16.1 GB, 291 tensors); B = A (reloads re-read A) to
           spare the host memory a second 16 GB copy would take
  moe      DeepSeek-V2-Lite shapes, 6 layers (6.85 GB, 1028 tensors)
  qwen3moe Qwen3-30B-A3B shapes, 4 layers (6.23 GB, 1575 tensors: 128 experts of 3.1 MB a layer);
           not in the default --shapes
  v3       DeepSeek-V3's layout (q_lora, noaux_tc routers, a multi-token-prediction layer the loader
           skips) at DeepSeek-V2-Lite's sizes, 6 layers; its block-fp8 twin quantizes every linear
           layer, as DeepSeek-V3 and Kimi-K2 ship; not in the default --shapes
  many     the MoE layout at small sizes, 52 layers (20 158 tensors, 0.68 GB): the update row's
           host time per tensor

Rows (--rows picks them; loadkit's rows for every shape run first, the peers after, so that a
time budget cuts the peers of the last shapes rather than loadkit's own rows):
  probe    ceilings, once: the pinned host-to-device copy and device-to-device copy rates
           (torch, 4 GiB), and BUILD/bin/raw_probe (pinning experiments, copies, page-cache reads)
  load     `loadkit load` in a fresh process (after CUDA start-up, pinning included) and again in
           one process (BUILD/bin/loadkit_bench load); the stages of a fresh load (--log-level debug);
           with 2 GPUs, `--tp-size 2` read once and fanned out, and with --no-fanout (aggregate GB/s,
           bytes_read per rank; reported missing with fewer GPUs)
  reload   reload bf16 and fp8 (online quantization) in one long-lived process, with the peak
           extra device memory, the stream's profile and the time before and after the stream
  update   update from tensors already on the device (a colocated trainer's) against
           device-to-device copies of the same bytes; host time per tensor; validation alone;
           and (not for "many") the same bf16 tensors into the model quantized online to fp8
           (the RL sync into an fp8 engine), against the bf16 update's rate
  blockfp8 pre-quantized 128x128 block-fp8 checkpoints of A and B (gen_checkpoint.py --block-fp8:
           the same values quantized): reload fp8 -> fp8 (rate against the bf16 reload's), and the
           RL sync: bf16 B's tensors on the device into the model loaded from fp8 A, quantized
           as they arrive (not for "many": DeepSeek-V2 at toy sizes has no whole 128-blocks)
  peers    InstantTensor, fastsafetensors, the Run:ai streamer, safetensors and transformers
           (bench/peers.py, a fresh process each: first load and best of the rest); a peer that
           cannot be imported is reported as missing, never left out
--plain-path adds the plain path (LOADKIT_STAGING=0: pread into host tensors, then a copy) for load and reload; --cold (root)
cold-cache loads; --sweep the staged load over reader threads, piece size and ring depth.
--budget-s: past this many seconds, rows not yet run are skipped (and listed as skipped).
--smoke: toy sizes on the CPU, no ceilings or peers: checks the bench itself where there is no GPU.
A loadkit process that fails leaves a row saying so, and the bench goes on.

Writes bench.json, bench.txt (tables and the targets) and, with matplotlib, bench.png under
--out. A benchmark, never a test: no pass or fail.
"""
import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "dense8": dict(args=["--shape", "dense", "--layers", "8"], title="Llama-3-8B shapes, 8 layers", twin=True),
    "dense32": dict(args=["--shape", "dense", "--layers", "32"], title="Llama-3-8B shapes, 32 layers", twin=False),
    "moe": dict(args=["--shape", "moe", "--layers", "6"], title="DeepSeek-V2-Lite shapes, 6 layers", twin=True,
                moe=True),
    "qwen3moe": dict(args=["--shape", "qwen3moe", "--layers", "4"], title="Qwen3-30B-A3B shapes, 4 layers", twin=True,
                     moe=True),
    "v3": dict(args=["--shape", "v3", "--layers", "6"], title="DeepSeek-V3 layout, DeepSeek-V2-Lite sizes, 6 layers",
               twin=True, moe=True, smoke=["--n-group", "2", "--topk-group", "2"]),
    "many": dict(args=["--shape", "many"], title="DeepSeek-V2 layout at small sizes, 52 layers", twin=True, moe=True),
}
ALL_PEERS = ["instanttensor", "fastsafetensors", "runai", "safetensors", "transformers"]
START = time.time()
DEVICE = "cuda"  # --smoke: "cpu"
# --smoke: every shape at toy sizes, on the CPU, without the ceilings and peers: a check of the
# bench itself (generation, every loadkit row, the tables), in a minute, where there is no GPU.
SMOKE_SIZES = ["--layers", "3", "--hidden", "64", "--intermediate", "96", "--heads", "4", "--kv-heads", "2", "--vocab", "500"]
SMOKE_MOE = ["--moe-intermediate", "32", "--experts", "8", "--head-dim", "16"]


def log(*x):
    print(f"[{time.time() - START:6.1f} s]", *x, flush=True)


def files_of(d):
    return sorted(glob.glob(os.path.join(d, "*.safetensors")))


def checkpoint_bytes(d):
    return sum(os.path.getsize(f) for f in files_of(d))


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


def row(name, nbytes, seconds, **extra):
    """A result: best and median of `seconds` (a list) for `nbytes`."""
    out = {"name": name, "bytes": nbytes, "seconds_min": min(seconds), "seconds_median": statistics.median(seconds),
           "gb_per_s": nbytes / min(seconds) / 1e9, "gb_per_s_median": nbytes / statistics.median(seconds) / 1e9,
           "seconds": seconds}
    out.update(extra)
    return out


def absent(name, why):
    return {"name": name, "status": why}


def cli_load(build, model, env=None, quant="none", level="warn"):
    with tempfile.NamedTemporaryFile(suffix=".json") as rep:
        p = subprocess.run([os.path.join(build, "bin", "loadkit"), "load", "--model", model, "--device", DEVICE,
                            "--quantization", quant, "--report", rep.name, "--log-level", level],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, **(env or {})))
        return json.load(open(rep.name)), p.stderr


def bench_tool(build, args, env=None):
    out = subprocess.run([os.path.join(build, "bin", "loadkit_bench")] + args + ["--device", DEVICE], check=True,
                         capture_output=True,
                         text=True, env=dict(os.environ, **(env or {})))
    return json.loads(out.stdout)


def fresh_load_stages(stderr):
    """`loadkit load --log-level debug`: the engine's stage lines and the stream's profile."""
    stages = {}
    for m in re.finditer(r"load stage ([^:]+): ([0-9.]+) ms", stderr):
        stages[m.group(1)] = float(m.group(2))
    m = re.search(r"staging reader 0: stream and \d+ pinned buffers ready in ([0-9.]+) ms", stderr)
    if m:
        stages["reader 0 ring pinned"] = float(m.group(1))
    profile = [line.split("] ", 2)[-1] for line in stderr.splitlines() if "staging profile:" in line]
    return {"stages_ms": stages, "staging": profile[-1] if profile else None}


def by_plan(r):
    """How many of a reload row's repeats went by the plan of the one before (the first records it):
    "first" GB/s is then the full path, the best and median ones the replays."""
    flags = r.get("by_plan", [])
    return f"{sum(1 for f in flags if f)} of {len(flags)}"


def reload_profile(r):
    """Where a reload row's time went (loadkit_bench's per-repeat stages): medians over the repeats."""
    stages = r.get("stages", [])
    return {
        "before_stream_ms": median_of(stages, "before_stream_ms"),
        "open_checkpoint_ms": median_of(stages, "open_checkpoint_ms"),
        "stream_open_ms": median_of(stages, "staging", "open_ms"),
        "consumer_wait_ms": median_of(stages, "staging", "consumer_wait_ms"),
        "consumer_work_ms": median_of(stages, "staging", "consumer_work_ms"),
        "consumer_work_after_rebuilt_ms": median_of(stages, "staging", "consumer_work_after_reserved_ms"),
        "consumer_free_ms": median_of(stages, "staging", "consumer_free_ms"),
        "consumer_event_ms": median_of(stages, "staging", "consumer_event_ms"),
        "reader_cuda_calls": median_of(stages, "staging", "reader_cuda_calls"),
        "consumer_stream_waits": median_of(stages, "staging", "consumer_stream_waits"),
        "after_stream_ms": median_of(stages, "after_stream_ms"),
        "validate_ms": r["validate"]["seconds_min"] * 1e3,
        "bypassed_tensors": median_of(stages, "staging", "bypassed_tensors"),
        "readers_window_wait_ms": median_of(stages, "staging", "window_wait_ms"),
        "readers_ring_wait_ms": median_of(stages, "staging", "ring_wait_ms"),
        "last": stages[-1] if stages else None,
    }


def median_of(stages, *path):
    values = []
    for s in stages:
        v = s
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            values.append(v)
    return statistics.median(values) if values else None


def guarded(results, name, fn):
    """Runs a row; a loadkit process that fails becomes a row saying so (the bench goes on)."""
    try:
        fn()
    except (subprocess.CalledProcessError, KeyError, ValueError) as e:
        why = f"{type(e).__name__}: {e}"
        if isinstance(e, subprocess.CalledProcessError):
            tail = (e.stderr or "").strip().splitlines()
            why = f"exit {e.returncode}: {tail[-1] if tail else 'no message'}"
        results.append(absent(name, "failed: " + why))
        log(name, "failed:", why)


class Budget:
    def __init__(self, seconds):
        self.seconds, self.skipped = seconds, []

    def allows(self, what):
        if time.time() - START < self.seconds:
            return True
        self.skipped.append(what)
        log("skipped (time budget):", what)
        return False


def measure_ceilings(repeats):
    n = 4 << 30
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d, d2d = [], []
    for _ in range(repeats):
        torch.cuda.synchronize(); t = time.perf_counter()
        dev.copy_(host, non_blocking=True); torch.cuda.synchronize()
        h2d.append(time.perf_counter() - t)
        t = time.perf_counter()
        dev2.copy_(dev); torch.cuda.synchronize()
        d2d.append(time.perf_counter() - t)
    del host, dev, dev2
    torch.cuda.empty_cache()
    return row("pinned_h2d_ceiling", n, h2d), row("d2d_ceiling", n, d2d)


def loadkit_rows(a, shape, A, B, nbytes, budget, results, profile, fp8_dirs=None):
    build = a.build

    def loads():
        reps = [cli_load(build, A)[0] for _ in range(a.repeats)]
        # Every repeat is a new process: each is a first load (pinning, model build and all).
        results.append(row("loadkit_load_fresh_process", reps[0]["bytes"], [r["seconds"] for r in reps],
                           peak_extra_device_bytes=max(r["peak_extra_device_bytes"] or 0 for r in reps)))
        _, stderr = cli_load(build, A, level="debug")
        profile["fresh_load"] = fresh_load_stages(stderr)
        if a.plain_path:
            reps = [cli_load(build, A, {"LOADKIT_STAGING": "0"})[0] for _ in range(a.repeats)]
            results.append(row("loadkit_load_fresh_process_plain_path", reps[0]["bytes"], [r["seconds"] for r in reps]))
        r = bench_tool(build, ["load", "--model", A, "--repeats", str(a.repeats + 1)])["load"]
        results.append(row("loadkit_load_in_process", r["bytes"], r["seconds"][1:], first_s=r["seconds"][0]))
        profile["in_process_load_staging"] = r.get("staging")

    def tp_loads(n):
        """`loadkit load --tp-size n`: every rank reading a 1/n share and the ranks broadcasting the
        shares (LOADKIT_FANOUT=1: opt-in on CUDA), and every rank reading the whole checkpoint (--no-fanout). Aggregate
        rate: n x the checkpoint's bytes (each rank takes in all of it) over the slowest rank's time."""
        for label, extra in ((f"loadkit_load_tp{n}_fanout", []), (f"loadkit_load_tp{n}_every_rank_reads", ["--no-fanout"])):
            reps = []
            for _ in range(a.repeats):
                with tempfile.NamedTemporaryFile(suffix=".json") as rep:
                    subprocess.run([os.path.join(build, "bin", "loadkit"), "load", "--model", A, "--device", DEVICE,
                                    "--quantization", "none", "--tp-size", str(n), "--report", rep.name,
                                    "--log-level", "warn"] + extra,
                                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, NCCL_NVLS_ENABLE="0", LOADKIT_FANOUT="1"))
                    reps.append(json.load(open(rep.name)))
            seconds = [max(r["seconds"] for r in rep["ranks"]) for rep in reps]
            results.append(row(label, n * reps[0]["bytes"], seconds, tp_size=n,
                               bytes_read_per_rank=[r["bytes_read"] for r in reps[0]["ranks"]]))

    def reload(quant, suffix, env, label):
        r = bench_tool(build, ["reload", "--model", A, "--from", B, "--quantization", quant,
                               "--repeats", str(max(a.repeats, 3))], env)["reload"]
        results.append(row(label, r["bytes"], r["seconds"], peak_extra_device_bytes=r["peak_extra_device_bytes"],
                           pointers_stable=r["pointers_stable"], reloads_by_plan=by_plan(r),
                           first_s=r["seconds"][0]))
        if not suffix:
            profile[label] = reload_profile(r)

    def update(quant="none"):
        u = bench_tool(build, ["update", "--model", A, "--from", B, "--quantization", quant,
                               "--repeats", str(max(a.repeats, 3))])
        up, block = u["update"], u["d2d_copy_one_block"]
        per_tensor = (up["seconds_min"] - block["seconds_min"]) / up["tensors"] * 1e6
        label = f"loadkit_update_from_device_{'bf16' if quant == 'none' else quant}"
        results.append(row(label, up["bytes"], up["seconds"],
                           peak_extra_device_bytes=up["peak_extra_device_bytes"], pointers_stable=up["pointers_stable"],
                           tensors=up["tensors"], host_us_per_tensor=up["host_us_per_tensor"],
                           first_sync_host_us_per_tensor=up.get("host_us_per_tensor_first"),
                           replayed_by_plan=bool(up.get("last_chunks_replayed")),
                           overhead_us_per_tensor=per_tensor, validate_us_per_tensor=up["validate"]["us_per_tensor"]))
        if quant == "none":
            results.append(row("d2d_copy_per_tensor", u["d2d_copy_per_tensor"]["bytes"], u["d2d_copy_per_tensor"]["seconds"]))
            results.append(row("d2d_copy_one_block", block["bytes"], block["seconds"]))

    if "load" in a.rows and shape != "many" and budget.allows(f"{shape} load"):
        guarded(results, "loadkit_load", loads)
        gpus = torch.cuda.device_count() if DEVICE == "cuda" else 0
        if gpus >= 2:
            guarded(results, "loadkit_load_tp2", lambda: tp_loads(2))
        else:
            results.append(absent("loadkit_load_tp2_fanout", f"missing: needs 2 GPUs, {gpus} here"))
        log(shape, "loads done")
    if "reload" in a.rows and shape != "many":
        variants = [("", {})] + ([("_plain_path", {"LOADKIT_STAGING": "0"})] if a.plain_path else [])
        for quant in ("none", "fp8"):
            for suffix, env in variants:
                label = f"loadkit_reload_{'bf16' if quant == 'none' else quant}{suffix}"
                if budget.allows(f"{shape} {label}"):
                    guarded(results, label, lambda: reload(quant, suffix, env, label))
        log(shape, "reloads done")
    if "update" in a.rows and budget.allows(f"{shape} update"):
        guarded(results, "loadkit_update_from_device_bf16", update)
        # A bf16 trainer's sync into an online-fp8 engine (its quantized modules' writes replayed too).
        if shape != "many" and budget.allows(f"{shape} update fp8"):
            guarded(results, "loadkit_update_from_device_fp8", lambda: update("fp8"))
        log(shape, "update done")
    if "blockfp8" in a.rows and fp8_dirs and budget.allows(f"{shape} blockfp8"):
        A8, B8 = fp8_dirs

        def block_fp8_reload():
            r = bench_tool(build, ["reload", "--model", A8, "--from", B8, "--quantization", "auto",
                                   "--repeats", str(max(a.repeats, 3))])["reload"]
            results.append(row("loadkit_reload_block_fp8", r["bytes"], r["seconds"],
                               peak_extra_device_bytes=r["peak_extra_device_bytes"], pointers_stable=r["pointers_stable"],
                               reloads_by_plan=by_plan(r), first_s=r["seconds"][0]))
            profile["loadkit_reload_block_fp8"] = reload_profile(r)

        def block_fp8_sync():
            u = bench_tool(build, ["update", "--model", A8, "--from", B, "--quantization", "auto",
                                   "--repeats", str(max(a.repeats, 3))])["update"]
            results.append(row("loadkit_sync_bf16_to_block_fp8", u["bytes"], u["seconds"],
                               peak_extra_device_bytes=u["peak_extra_device_bytes"], pointers_stable=u["pointers_stable"],
                               tensors=u["tensors"], host_us_per_tensor=u["host_us_per_tensor"]))

        guarded(results, "loadkit_reload_block_fp8", block_fp8_reload)
        guarded(results, "loadkit_sync_bf16_to_block_fp8", block_fp8_sync)
        log(shape, "block fp8 done")


def peer_rows(a, shape, A, budget, results):
    for peer in a.peers:
        if peer == "transformers" and a.skip_transformers:
            results.append(absent(f"peer_{peer}", "skipped: --skip-transformers"))
            continue
        if not budget.allows(f"{shape} peer {peer}"):
            results.append(absent(f"peer_{peer}", "skipped: time budget"))
            continue
        repeats = 2 if peer in ("transformers", "safetensors") else a.repeats
        p = subprocess.run([sys.executable, os.path.join(HERE, "peers.py"), peer, A, "--repeats", str(repeats)],
                           capture_output=True, text=True)
        try:
            r = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            r = {"failed": f"exit {p.returncode}: {tail}"}
        if "seconds" in r:
            s = r["seconds"]
            nbytes = checkpoint_bytes(A)
            results.append(row(f"peer_{peer}", nbytes, s[1:] or s, first_s=s[0], first_gb_per_s=nbytes / s[0] / 1e9))
        else:
            results.append(absent(f"peer_{peer}", "missing: " + r["missing"] if "missing" in r else "failed: " + r["failed"]))
        log(shape, "peer", peer, results[-1].get("status") or f"{results[-1]['gb_per_s']:.1f} GB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", help="the loadkit build directory")
    ap.add_argument("--work", help="where the checkpoints go (/dev/shm on the GPU machine)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="moe,dense32,many,dense8")
    ap.add_argument("--rows", default="probe,load,reload,update,blockfp8,peers")
    ap.add_argument("--peers", default=",".join(ALL_PEERS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--plain-path", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--report-only", metavar="BENCH_JSON", help="write bench.txt and bench.png again from a bench.json")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: a check of the bench itself")
    a = ap.parse_args()
    global DEVICE
    if a.smoke:
        DEVICE = "cpu"
        a.rows = ",".join(r for r in a.rows.split(",") if r not in ("probe", "peers"))
    if a.report_only:
        out = json.load(open(a.report_only))
        text = report(out)
        open(os.path.join(a.out, "bench.txt"), "w").write(text)
        print(text)
        plot(out, os.path.join(a.out, "bench.png"))
        return
    a.rows = set(a.rows.split(","))
    a.peers = [p for p in a.peers.split(",") if p]
    if not a.build or not a.work:
        ap.error("--build and --work are needed (or --report-only)")
    shapes = [s for s in a.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: '{s}' is not one of {', '.join(SHAPES)}")
    os.makedirs(a.out, exist_ok=True)
    budget = Budget(a.budget_s)

    # Checkpoints first: everything after reads the same warm files.
    dirs, fp8_dirs = {}, {}
    for s in shapes:
        spec = SHAPES[s]
        A = os.path.join(a.work, s, "a")
        B = os.path.join(a.work, s, "b") if spec["twin"] else A
        for d, seed in ((A, 0), (B, 1)) if spec["twin"] else ((A, 0),):
            smoke = SMOKE_SIZES + (SMOKE_MOE if spec.get("moe") else []) + spec.get("smoke", []) if a.smoke else []
            if a.smoke and s == "dense32":
                smoke = [x if x != "3" else "4" for x in smoke]  # another size than dense8's
            subprocess.run([sys.executable, os.path.join(HERE, "gen_checkpoint.py"), d, "--seed", str(seed)] + spec["args"]
                           + smoke, check=True)
            warm(d)
        dirs[s] = (A, B)
        log("checkpoint", s, f"{checkpoint_bytes(A) / 1e9:.2f} GB")
        if "blockfp8" in a.rows and s != "many":
            pairs = ((A + "_fp8", 0), (B + "_fp8", 1)) if spec["twin"] else ((A + "_fp8", 0),)
            for d, seed in pairs:
                subprocess.run([sys.executable, os.path.join(HERE, "gen_checkpoint.py"), d, "--seed", str(seed),
                                "--block-fp8"] + spec["args"] + smoke, check=True)
                warm(d)
            fp8_dirs[s] = (A + "_fp8", (B if spec["twin"] else A) + "_fp8")

    out = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "shapes": {},
           "skipped": budget.skipped}
    ceilings = []
    if "probe" in a.rows:
        ceilings = list(measure_ceilings(a.repeats))
        probe = os.path.join(a.build, "bin", "raw_probe")
        if os.path.exists(probe):
            first = dirs[shapes[0]][0]
            p = subprocess.run([probe, "--out", os.path.join(a.out, "raw_probe.json"), "--sections",
                                "pinning,copies,smallcopies,contention,alloc,reads"] + files_of(first),
                               stdout=open(os.path.join(a.out, "raw_probe.txt"), "w"), stderr=subprocess.PIPE, text=True)
            out["raw_probe"] = (json.load(open(os.path.join(a.out, "raw_probe.json"))) if p.returncode == 0 else
                                f"failed: exit {p.returncode}: {p.stderr.strip()[-300:]}")
        else:
            out["raw_probe"] = f"missing: {probe} (a CUDA build makes it)"
        log("ceilings: pinned H2D", round(ceilings[0]["gb_per_s"], 1), "GB/s, D2D", round(ceilings[1]["gb_per_s"], 1))

    # loadkit's rows for every shape first, the other loaders after: under a time budget, what
    # is left out is the peers of the last shapes, not loadkit's own rows.
    for s in shapes:
        A, B = dirs[s]
        nbytes = checkpoint_bytes(A)
        tensors = len(json.load(open(os.path.join(A, "model.safetensors.index.json")))["weight_map"])
        results, profile = list(ceilings), {}
        loadkit_rows(a, s, A, B, nbytes, budget, results, profile, fp8_dirs.get(s))
        if a.sweep and s == "dense8":
            for threads in (16, 24):
                for piece_kb in (1024, 2048, 4096):
                    for depth in (2, 4):
                        env = {"LOADKIT_STAGING_THREADS": str(threads), "LOADKIT_STAGING_PIECE_KB": str(piece_kb),
                               "LOADKIT_STAGING_DEPTH": str(depth)}
                        reps = [cli_load(a.build, A, env)[0] for _ in range(2)]
                        results.append(row(f"sweep load t{threads} p{piece_kb}k d{depth}", reps[0]["bytes"],
                                           [r["seconds"] for r in reps]))
        if a.cold and s == "dense8":
            if drop_page_cache():
                cold = []
                for _ in range(2):
                    drop_page_cache()
                    cold.append(cli_load(a.build, A)[0]["seconds"])
                results.append(row("loadkit_load_cold_cache", nbytes, cold))
                warm(A)
            else:
                results.append(absent("loadkit_load_cold_cache", "skipped: cannot write /proc/sys/vm/drop_caches"))
        out["shapes"][s] = {"title": SHAPES[s]["title"], "bytes": nbytes, "tensors": tensors,
                            "reload_source": "B (other weights)" if A != B else "A again (same checkpoint)",
                            "results": results, "profile": profile}
    if "peers" in a.rows:
        for s in shapes:
            if s != "many":
                peer_rows(a, s, dirs[s][0], budget, out["shapes"][s]["results"])
    for d in out["shapes"].values():
        d["ratios"] = ratios_of(d["results"])
    # Drift: the ceiling again at the end.
    if "probe" in a.rows:
        out["ceilings_at_end"] = list(measure_ceilings(a.repeats))
    out["seconds"] = time.time() - START
    json.dump(out, open(os.path.join(a.out, "bench.json"), "w"), indent=2)
    text = report(out)
    open(os.path.join(a.out, "bench.txt"), "w").write(text)
    print(text)
    plot(out, os.path.join(a.out, "bench.png"))
    if a.smoke:  # a check of the bench: every row ran, and what loadkit itself promises held
        broken = [f"{s} {r['name']}: {r['status']}" for s, d in out["shapes"].items() for r in d["results"]
                  if r.get("status", "").startswith("failed")]
        broken += [f"{s} {r['name']}: pointers moved" for s, d in out["shapes"].items() for r in d["results"]
                   if r.get("pointers_stable") is False]
        if broken:
            sys.exit("bench smoke: " + "; ".join(broken))


def ratios_of(results):
    by = {r["name"]: r for r in results if "gb_per_s" in r}
    h2d = by.get("pinned_h2d_ceiling", {}).get("gb_per_s")
    d2d = by.get("d2d_copy_one_block", by.get("d2d_ceiling", {})).get("gb_per_s")
    out = {}

    def ratio(key, num, den):
        if num in by and den:
            out[key] = by[num]["gb_per_s"] / den

    bf16 = by.get("loadkit_reload_bf16", {}).get("gb_per_s")
    ratio("fp8_reload_vs_bf16_reload", "loadkit_reload_fp8", bf16)
    ratio("block_fp8_reload_vs_bf16_reload", "loadkit_reload_block_fp8", bf16)
    ratio("bf16_reload_vs_pinned_h2d", "loadkit_reload_bf16", h2d)
    # The first reload of each row takes the full path (validation, the loaders) and records the
    # plan the others replay (runtime/src/reload/reload_plan.h): the same ratios between first ones.
    first = {n: r["bytes"] / r["first_s"] / 1e9 for n, r in by.items() if n.startswith("loadkit_reload") and "first_s" in r}
    if "loadkit_reload_bf16" in first:
        for key, num in (("fp8", "loadkit_reload_fp8"), ("block_fp8", "loadkit_reload_block_fp8")):
            if num in first:
                out[f"{key}_reload_vs_bf16_reload_first_ones"] = first[num] / first["loadkit_reload_bf16"]
        if h2d:
            out["bf16_reload_first_vs_pinned_h2d"] = first["loadkit_reload_bf16"] / h2d
    ratio("update_vs_d2d", "loadkit_update_from_device_bf16", d2d)
    ratio("fp8_update_vs_bf16_update", "loadkit_update_from_device_fp8", by.get("loadkit_update_from_device_bf16", {}).get("gb_per_s"))
    ratio("in_process_load_vs_pinned_h2d", "loadkit_load_in_process", h2d)
    ratio("fresh_process_load_vs_pinned_h2d", "loadkit_load_fresh_process", h2d)
    if "loadkit_load_fresh_process" in by and h2d:
        out["fresh_process_load_median_vs_pinned_h2d"] = by["loadkit_load_fresh_process"]["gb_per_s_median"] / h2d
    for peer in ("instanttensor", "fastsafetensors"):
        if f"peer_{peer}" in by and "loadkit_load_fresh_process" in by:
            out[f"fresh_process_load_vs_{peer}_first"] = (by["loadkit_load_fresh_process"]["gb_per_s"] /
                                                          by[f"peer_{peer}"]["first_gb_per_s"])
    return out


# The targets: (ratio key, shape, bound).
TARGETS = [
    ("fp8 reload >= 0.9 x bf16 reload (dense 32 layers)", "dense32", "fp8_reload_vs_bf16_reload", 0.9),
    ("fp8 reload >= 0.9 x bf16 reload (dense 8 layers)", "dense8", "fp8_reload_vs_bf16_reload", 0.9),
    ("fp8 reload >= 0.9 x bf16 reload (MoE)", "moe", "fp8_reload_vs_bf16_reload", 0.9),
    ("block-fp8 reload >= 0.9 x bf16 reload (dense 8 layers)", "dense8", "block_fp8_reload_vs_bf16_reload", 0.9),
    ("block-fp8 reload >= 0.9 x bf16 reload (MoE)", "moe", "block_fp8_reload_vs_bf16_reload", 0.9),
    ("bf16 reload >= 0.9 x pinned H2D (dense 32 layers)", "dense32", "bf16_reload_vs_pinned_h2d", 0.9),
    ("bf16 reload >= 0.85 x pinned H2D (MoE)", "moe", "bf16_reload_vs_pinned_h2d", 0.85),
    ("update >= 0.8 x D2D (dense 32 layers)", "dense32", "update_vs_d2d", 0.8),
    ("update >= 0.5 x D2D (MoE)", "moe", "update_vs_d2d", 0.5),
    ("first load, fresh process >= 0.8 x pinned H2D (dense 32 layers)", "dense32", "fresh_process_load_vs_pinned_h2d", 0.8),
    ("first load, fresh process >= 0.75 x pinned H2D (MoE)", "moe", "fresh_process_load_vs_pinned_h2d", 0.75),
    # The same MoE targets on Qwen3-MoE's and DeepSeek-V3's layouts (--shapes qwen3moe,v3).
    ("fp8 reload >= 0.9 x bf16 reload (Qwen3-MoE)", "qwen3moe", "fp8_reload_vs_bf16_reload", 0.9),
    ("block-fp8 reload >= 0.9 x bf16 reload (Qwen3-MoE)", "qwen3moe", "block_fp8_reload_vs_bf16_reload", 0.9),
    ("bf16 reload >= 0.85 x pinned H2D (Qwen3-MoE)", "qwen3moe", "bf16_reload_vs_pinned_h2d", 0.85),
    ("update >= 0.5 x D2D (Qwen3-MoE)", "qwen3moe", "update_vs_d2d", 0.5),
    ("first load, fresh process >= 0.75 x pinned H2D (Qwen3-MoE)", "qwen3moe", "fresh_process_load_vs_pinned_h2d", 0.75),
    ("fp8 reload >= 0.9 x bf16 reload (DeepSeek-V3 layout)", "v3", "fp8_reload_vs_bf16_reload", 0.9),
    ("block-fp8 reload >= 0.9 x bf16 reload (DeepSeek-V3 layout)", "v3", "block_fp8_reload_vs_bf16_reload", 0.9),
    ("bf16 reload >= 0.85 x pinned H2D (DeepSeek-V3 layout)", "v3", "bf16_reload_vs_pinned_h2d", 0.85),
]


def report(out):
    lines = [f"device {out['device']}; bench {out['seconds']:.0f} s"]
    for s, d in out["shapes"].items():
        lines += ["", f"== {s}: {d['title']}, {d['bytes'] / 1e9:.2f} GB, {d['tensors']} tensors "
                      f"(reloads from {d['reload_source']}) ==",
                  f"{'what':40} {'GB/s':>8} {'median':>8} {'first GB/s':>10} {'min s':>8} {'x H2D':>6}  notes"]
        h2d = next((r["gb_per_s"] for r in d["results"] if r["name"] == "pinned_h2d_ceiling"), None)
        for r in d["results"]:
            if "status" in r:
                lines.append(f"{r['name']:40} {r['status']}")
                continue
            notes = []
            if r.get("peak_extra_device_bytes") is not None:
                notes.append(f"peak extra {r['peak_extra_device_bytes'] / 2**20:.0f} MiB")
            if "pointers_stable" in r:
                notes.append("pointers stable" if r["pointers_stable"] else "POINTERS MOVED")
            for key, label in (("host_us_per_tensor", "host us/tensor"),
                               ("first_sync_host_us_per_tensor", "first sync (validated, plan recorded) host us/tensor"),
                               ("replayed_by_plan", "replayed by plan"),
                               ("reloads_by_plan", "reloads by plan"),
                               ("overhead_us_per_tensor", "over D2D us/tensor"),
                               ("validate_us_per_tensor", "validation us/tensor"), ("tensors", "tensors")):
                if key in r:
                    notes.append(f"{label} {r[key]:.1f}" if isinstance(r[key], float) else f"{label} {r[key]}")
            first = f"{r['bytes'] / r['first_s'] / 1e9:10.2f}" if "first_s" in r else ""
            vs_h2d = f"{r['gb_per_s'] / h2d:6.2f}" if h2d else ""
            lines.append(f"{r['name']:40} {r['gb_per_s']:8.2f} {r['gb_per_s_median']:8.2f} {first:>10} "
                         f"{r['seconds_min']:8.4f} {vs_h2d:>6}  {'; '.join(notes)}")
        for k, v in d["ratios"].items():
            lines.append(f"  {k}: {v:.3f}")
        for k, v in d["profile"].items():
            if k.startswith("loadkit_reload"):
                parts = [f"{n} {x:.1f}" for n, x in v.items() if isinstance(x, (int, float))]
                lines.append(f"  profile {k} (median of repeats; times in ms): " + ", ".join(parts))
            elif k == "fresh_load":
                lines.append("  profile fresh load (ms): " +
                             ", ".join(f"{n} {x:.1f}" for n, x in v["stages_ms"].items()))
                if v.get("staging"):
                    lines.append("    " + v["staging"])
    lines += ["", "== targets (ratios within this run) =="]
    for label, shape, key, bound in TARGETS:
        v = out["shapes"].get(shape, {}).get("ratios", {}).get(key)
        lines.append(f"  {label:66} " + ("not measured" if v is None else f"{v:.3f} {'met' if v >= bound else 'NOT met'}"))
    many = out["shapes"].get("many")
    if many:
        u = next((r for r in many["results"] if r["name"] == "loadkit_update_from_device_bf16"), None)
        if u:
            lines.append(f"  {'20 000-tensor update: host us per tensor <= 5':66} {u['host_us_per_tensor']:.2f} "
                         f"{'met' if u['host_us_per_tensor'] <= 5 else 'NOT met'} ({u['tensors']} tensors)")
    if out.get("skipped"):
        lines.append("skipped for the time budget: " + ", ".join(out["skipped"]))
    return "\n".join(lines) + "\n"


def plot(out, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    shapes = [s for s in out["shapes"] if s != "many"]
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), 1, figsize=(10, 4 * len(shapes)), squeeze=False)
    for ax, s in zip(axes[:, 0], shapes):
        d = out["shapes"][s]
        rows = [r for r in d["results"] if not r["name"].startswith("d2d")]
        names = [r["name"] + (" (" + r["status"].split(":")[0] + ")" if "status" in r else "") for r in rows][::-1]
        ax.barh(names, [r.get("gb_per_s", 0) for r in rows][::-1], color="tab:blue", label="best")
        firsts = [(n, r["bytes"] / r["first_s"] / 1e9) for n, r in zip(names, rows[::-1]) if "first_s" in r]
        if firsts:
            ax.scatter([v for _, v in firsts], [n for n, _ in firsts], color="tab:orange", zorder=3, label="first")
        for name, style, label in (("pinned_h2d_ceiling", "--", "pinned H2D"), ("d2d_copy_one_block", ":", "D2D")):
            ceiling = next((r["gb_per_s"] for r in d["results"] if r["name"] == name), None)
            if ceiling:
                ax.axvline(ceiling, color="gray", linestyle=style, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("GB/s (checkpoint bytes / seconds)")
        ax.set_title(f"{out['device']}: {s}, {d['title']}, {d['bytes'] / 1e9:.2f} GB")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
