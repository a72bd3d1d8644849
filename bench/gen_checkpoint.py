#!/usr/bin/env python3
"""Writes a Llama-shaped bf16 checkpoint of random values (no network needed).

    gen_checkpoint.py OUT_DIR [--layers 32] [--hidden 4096] [--intermediate 14336]
                      [--heads 32] [--kv-heads 8] [--vocab 128256] [--shard-gb 2] [--seed 0]

Defaults are Llama-3-8B's shapes; lower --layers for a smaller file set.
Skips the work when OUT_DIR already holds a checkpoint of the same settings.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    settings = vars(a).copy()
    settings.pop("out")
    stamp = os.path.join(a.out, "bench_settings.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == settings:
        return
    os.makedirs(a.out, exist_ok=True)
    head_dim = a.hidden // a.heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
        "intermediate_size": a.intermediate, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    shapes = [("model.embed_tokens.weight", (a.vocab, a.hidden))]
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (a.hidden,)),
            (p + "self_attn.q_proj.weight", (a.heads * head_dim, a.hidden)),
            (p + "self_attn.k_proj.weight", (a.kv_heads * head_dim, a.hidden)),
            (p + "self_attn.v_proj.weight", (a.kv_heads * head_dim, a.hidden)),
            (p + "self_attn.o_proj.weight", (a.hidden, a.heads * head_dim)),
            (p + "post_attention_layernorm.weight", (a.hidden,)),
            (p + "mlp.gate_proj.weight", (a.intermediate, a.hidden)),
            (p + "mlp.up_proj.weight", (a.intermediate, a.hidden)),
            (p + "mlp.down_proj.weight", (a.hidden, a.intermediate)),
        ]
    shapes += [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]
    # Random values drawn on the GPU where there is one (seconds instead of minutes for 8B parameters).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(a.seed)
    limit = int(a.shard_gb * 2**30)
    shards, current, size = [], {}, 0
    for name, shape in shapes:
        t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        if current and size + t.nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(a.out, file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(a.out, "model.safetensors.index.json"), "w"))
    json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    json.dump(settings, open(stamp, "w"))


if __name__ == "__main__":
    main()
