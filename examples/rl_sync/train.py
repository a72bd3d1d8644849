#!/usr/bin/env python3
"""An RL trainer's weight sync into loadkit, three ways, checked every step.

A tiny Llama is trained with a real loss (next-token prediction) and a real optimizer (AdamW);
after every step its weights are pushed into a loadkit.Model that serves the same architecture,
and loadkit's logits are compared with the trainer's own forward pass on the same tokens.

    python train.py --mode update   # model.update(trainer.named_parameters()): one call, zero-copy
    python train.py --mode stream   # begin_update(); update(bucket) per bucket; finish_update()
    torchrun --standalone --nproc-per-node 2 train.py --mode fsdp
                                    # FSDP2-sharded trainer ranks; model.sync_fsdp_shards(group, ...)
                                    # gathers one layer at a time into each rank's model
    python train.py --mode fsdp     # the same: starts torchrun itself (--ranks N, default 2)
    python train.py --mode update stream fsdp   # all three in turn

Options: --device cpu|cuda (fsdp on CUDA: one GPU per rank), --steps N, --model DIR (a Hugging
Face checkpoint to start from instead of a random tiny Llama), --tolerance (max |logits
difference| allowed, float32). Exits 1 when a step's logits differ beyond it or did not change,
77 when this machine can run none of the modes asked for (the reasons printed; a mode it cannot
run among others is skipped with its reason), 0 otherwise.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

import loadkit

transformers = None  # imported once a mode runs (a skip needs only torch)

SKIP = 77


def tiny_llama(out):
    """A random tiny Llama written by transformers: what loadkit loads first (the 'inference' copy)."""
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def trainer_model(path, device):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").to(device)


def batch(vocab, device, seed=1):
    """The training data: a fixed batch of token sequences (the loss is next-token prediction)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (4, 32), generator=gen).to(device)


def trainer_logits(trainer, tokens):
    with torch.no_grad():
        return trainer(tokens.unsqueeze(0)).logits[0].float().cpu()


def buckets(named_parameters, bucket_bytes):
    """(name, tensor) lists of about bucket_bytes each, as a trainer streams its weights."""
    bucket, size = [], 0
    for name, tensor in named_parameters:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


class Checker:
    """Per step: loadkit's logits equal the trainer's, and they moved since the previous step
    (`previous` starts as loadkit's logits before any training)."""

    def __init__(self, tolerance, label):
        self.tolerance, self.label, self.previous, self.failures = tolerance, label, None, []

    def check(self, step, loss, ours, theirs, report, seconds):
        diff = (ours - theirs).abs().max().item()
        moved = (ours - self.previous).abs().max().item()
        self.previous = ours
        status = "ok"
        if diff > self.tolerance:
            status = f"FAIL: logits differ by {diff:.3g} > {self.tolerance:g}"
        elif moved <= 10 * self.tolerance:
            status = f"FAIL: logits moved only {moved:.3g} since the last step: the sync changed nothing"
        elif not report["pointers_stable"] or report["untouched_modules"]:
            status = f"FAIL: pointers_stable={report['pointers_stable']} untouched={report['untouched_modules']}"
        if status != "ok":
            self.failures.append(f"step {step}: {status}")
        sys.stdout.write(f"{self.label} step {step}: loss {loss:.4f}  sync {seconds * 1e3:7.2f} ms "
                         f"({report['bytes'] / 1e6:.2f} MB, {report['tensors']} tensors)  max |loadkit - trainer| "
                         f"{diff:.2e}  moved {moved:.2e}  {status}\n")
        sys.stdout.flush()


def train_step(trainer, optimizer, tokens):
    loss = trainer(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_single(args, mode):
    """update / stream: one process holds the trainer and the loadkit model."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"SKIPPED: --device cuda, but no CUDA device here")
        return SKIP
    work = tempfile.mkdtemp(prefix="rl-sync-")
    try:
        path = args.model or tiny_llama(os.path.join(work, "init"))
        trainer = trainer_model(path, device)
        optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3, weight_decay=0.01)
        data = batch(trainer.config.vocab_size, device)
        checker = Checker(args.tolerance, mode)
        with loadkit.Model(path, device=device, dtype="float32") as model:
            checker.previous = model.logits(data[0])
            for step in range(1, args.steps + 1):
                loss = train_step(trainer, optimizer, data)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                if mode == "update":
                    # One call: every parameter, zero-copy, validated whole, written in place.
                    report = model.update(trainer.named_parameters())
                else:
                    # As a trainer that streams buckets (e.g. through a broadcast) would.
                    model.begin_update()
                    for bucket in buckets(trainer.named_parameters(), args.bucket_bytes):
                        model.update(bucket)
                    report = model.finish_update()
                seconds = time.perf_counter() - start
                checker.check(step, loss, model.logits(data[0]), trainer_logits(trainer, data[0]), report, seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report_failures(checker)


def run_fsdp(args):
    """fsdp: every torchrun rank trains an FSDP2 shard and serves a whole loadkit model (TP 1)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if "WORLD_SIZE" not in os.environ:
        return launch(args)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        if torch.cuda.device_count() < world:
            if rank == 0:
                print(f"SKIPPED: fsdp on CUDA needs one GPU per rank: {world} ranks, "
                      f"{torch.cuda.device_count()} GPUs here")
            return SKIP
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        # loadkit's own group, from the same torchrun environment (see loadkit.RankGroup).
        group = loadkit.RankGroup.join(device.type)
    except loadkit.UsageError as e:
        if rank == 0:
            print(f"SKIPPED: {e}")
        dist.destroy_process_group()
        return SKIP

    shared = [None]
    if rank == 0:
        shared = [args.model or tiny_llama(os.path.join(tempfile.mkdtemp(prefix="rl-sync-"), "init"))]
    dist.broadcast_object_list(shared, src=0)
    path = shared[0]

    trainer = trainer_model(path, device)
    for layer in trainer.model.layers:
        fully_shard(layer)
    fully_shard(trainer)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3, weight_decay=0.01)
    data = batch(trainer.config.vocab_size, device)
    # Every rank trains on its own rows of the batch, as data parallelism does.
    rows = data.chunk(world)[rank]
    checker = Checker(args.tolerance, f"fsdp rank {rank}/{world}")
    with group, loadkit.Model(path, device=device, dtype="float32") as model:
        checker.previous = model.logits(data[0])
        for step in range(1, args.steps + 1):
            loss = train_step(trainer, optimizer, rows)
            start = time.perf_counter()
            # Collective: each rank passes its DTensor shards; one layer at a time is gathered.
            report = model.sync_fsdp_shards(group, trainer.named_parameters())
            seconds = time.perf_counter() - start
            theirs = trainer_logits(trainer, data[0])  # collective too: FSDP gathers for the forward
            checker.check(step, loss, model.logits(data[0]), theirs, report, seconds)
    failed = torch.tensor([len(checker.failures)])
    dist.all_reduce(failed)
    dist.destroy_process_group()
    if rank == 0 and not args.model:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return report_failures(checker) or (1 if failed.item() else 0)


def launch(args):
    """Not started by torchrun: checks that this machine can run the ranks, then runs torchrun."""
    backend = loadkit.rank_backends()[args.device]
    if backend is None:
        print(f"SKIPPED: fsdp on {args.device}: this loadkit was built without a collective backend for "
              f"{args.device} (loadkit.rank_backends())")
        return SKIP
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        print(f"SKIPPED: fsdp on CUDA needs one GPU per rank: {args.ranks} ranks, "
              f"{torch.cuda.device_count()} GPUs here")
        return SKIP
    import subprocess
    forwarded = [a for a in sys.argv[1:] if a not in ("update", "stream")]  # the ranks run fsdp only
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
               os.path.abspath(__file__), *forwarded]
    return subprocess.run(command).returncode


def report_failures(checker):
    for failure in checker.failures:
        print(f"{checker.label}: {failure}", file=sys.stderr)
    return 1 if checker.failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["update", "stream", "fsdp"], nargs="+", required=True,
                        help="one or more, run in turn (fsdp last: it runs in torchrun's ranks)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", help="a Hugging Face checkpoint to start from (default: a random tiny Llama)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logits difference| (float32)")
    parser.add_argument("--ranks", type=int, default=2, help="fsdp mode without torchrun: ranks to start")
    parser.add_argument("--bucket-bytes", type=int, default=64 << 10, help="stream mode: bytes per bucket")
    args = parser.parse_args()
    loadkit.set_log_level("warn")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIPPED: --device cuda, but no CUDA device here")
        sys.exit(SKIP)
    global transformers
    import transformers
    transformers.utils.logging.disable_progress_bar()
    codes = [run_single(args, mode) for mode in args.mode if mode != "fsdp"]
    if "fsdp" in args.mode:
        codes.append(run_fsdp(args))
    failed = [c for c in codes if c not in (0, SKIP)]
    code = failed[0] if failed else SKIP if all(c == SKIP for c in codes) else 0
    if "WORLD_SIZE" in os.environ:
        # A torchrun rank ends without the interpreter's finalization. torch's Gloo process group
        # (still held by the FSDP state) releases the last collective's work on its own worker
        # thread, and that work holds a Python tensor: released after finalization began, the
        # thread's GIL acquire ends it with pthread_exit, and the unwind is std::terminate (seen
        # about 1 run in 5 on 2 cores, in torch's ProcessGroupGloo::runLoop, not in loadkit).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
