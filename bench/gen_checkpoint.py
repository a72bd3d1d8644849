#!/usr/bin/env python3
"""Writes a bf16 checkpoint of random values in a real model's shapes (no network needed).

    gen_checkpoint.py OUT_DIR [--shape dense|moe|v3|qwen3moe|many] [--layers N] [--seed 0] [--shard-gb 2]
                      [--block-fp8] [size flags of the shape, below]

Shapes:
  dense  Llama-3-8B (LlamaForCausalLM): --hidden 4096 --intermediate 14336 --heads 32
         --kv-heads 8 --vocab 128256; --layers 32 is the whole model (16.1 GB), 8 layers 5.59 GB.
  moe    DeepSeek-V2-Lite (DeepseekV2ForCausalLM): hidden 2048, 16 MLA heads without q_lora
         (kv_lora_rank 512, qk_nope 128, qk_rope 64, v_head 128), vocab 102400, the first layer
         dense (intermediate 10944), then 64 routed experts of intermediate 1408 stored one tensor
         per projection (mlp.experts.{e}.gate_proj/up_proj/down_proj) and 2 shared experts.
         --layers 6 (the default for this shape): 1028 tensors, 6.85 GB.
  v3     DeepSeek-V3's layout (DeepseekV3ForCausalLM) at DeepSeek-V2-Lite's sizes: the moe shape
         plus q_lora_rank 768 (q_a_proj, q_a_layernorm, q_b_proj), noaux_tc routing (8 groups, 4
         chosen, each router with its e_score_correction_bias) and one multi-token-prediction layer
         (model.layers.<layers>.*: a decoder layer plus enorm/hnorm/eh_proj/shared_head) that a
         loader skips. With --block-fp8 every linear layer is fp8, as DeepSeek-V3 ships.
  qwen3moe  Qwen3-30B-A3B (Qwen3MoeForCausalLM): hidden 2048, 32 query heads and 4 key/value heads
         of head_dim 128 with per-head q_norm/k_norm, vocab 151936, every layer sparse: 128 routed
         experts of intermediate 768 stored one tensor per projection (mlp.experts.{e}.gate_proj/
         up_proj/down_proj), no shared experts, the router mlp.gate. --layers 4 (the default for
         this shape): 1575 tensors, 6.23 GB; its experts (3.1 MB each) are half DeepSeek-V2-Lite's.
  many   the moe layout at small sizes for a 20 000-tensor update: hidden 256, 128 experts of
         intermediate 64, 4 heads, vocab 32000, --layers 52 (the default): 20 158 tensors, 0.68 GB.
  --hidden, --intermediate, --moe-intermediate, --experts, --heads, --kv-heads, --head-dim, --vocab
  override a shape's sizes.

--block-fp8 writes the same values (same seed, same draws) quantized to 128x128 block fp8 by the
tests' reference quantizer (tests/fixtures/fp8_quant.py): every linear weight as float8_e4m3fn plus
its float32 `weight_scale_inv`, config.json's quantization_config saying so; embeddings, norms,
lm_head and MoE routers stay bf16 (DeepSeek's kv_b_proj is quantized, as DeepSeek-V3 ships it). So a
block-fp8 checkpoint of seed S is the bf16 checkpoint of seed S quantized offline. Its files are laid
out as safetensors.save_file lays out the fp8 checkpoints users have (the scales of a file together,
then the bf16 tensors, then the fp8 weights, each by name); the bf16 checkpoints keep the model's
order.

Random values are drawn on the GPU where there is one; files are written tensor by tensor
(safetensors layout: 8-byte header length, JSON header, data), so memory stays one tensor.
Skips the work when OUT_DIR already holds a checkpoint of the same settings.
"""
import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from fp8_quant import block_quantization_config, quantize_block_fp8  # noqa: E402

BLOCK = (128, 128)
KEEP_BF16 = ("embed_tokens", "lm_head", "norm", "mlp.gate.")


def block_fp8_entries(names_shapes):
    """(name, shape, dtype) of the block-fp8 checkpoint: each quantizable weight followed by its scales."""
    out = []
    for name, shape in names_shapes:
        if len(shape) == 2 and name.endswith(".weight") and not any(k in name for k in KEEP_BF16):
            out.append((name, shape, "F8_E4M3"))
            out.append((name + "_scale_inv", (-(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])), "F32"))
        else:
            out.append((name, shape, "BF16"))
    return out

SHAPES = {
    "dense": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256),
    "moe": dict(layers=6, hidden=2048, intermediate=10944, moe_intermediate=1408, experts=64, shared_experts=2,
                experts_per_token=6, heads=16, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128, vocab=102400),
    "v3": dict(layers=6, hidden=2048, intermediate=10944, moe_intermediate=1408, experts=64, shared_experts=1,
               experts_per_token=6, heads=16, q_lora_rank=768, kv_lora_rank=512, qk_nope=128, qk_rope=64, v_head=128,
               vocab=102400, n_group=8, topk_group=4, mtp_layers=1),
    "qwen3moe": dict(layers=4, hidden=2048, intermediate=6144, moe_intermediate=768, experts=128, experts_per_token=8,
                     heads=32, kv_heads=4, head_dim=128, vocab=151936),
    "many": dict(layers=52, hidden=256, intermediate=512, moe_intermediate=64, experts=128, shared_experts=1,
                 experts_per_token=6, heads=4, kv_lora_rank=64, qk_nope=32, qk_rope=16, v_head=32, vocab=32000),
}


def dense_model(s):
    head_dim = s["hidden"] // s["heads"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    h, i = s["hidden"], s["intermediate"]
    shapes = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (s["heads"] * head_dim, h)),
            (p + "self_attn.k_proj.weight", (s["kv_heads"] * head_dim, h)),
            (p + "self_attn.v_proj.weight", (s["kv_heads"] * head_dim, h)),
            (p + "self_attn.o_proj.weight", (h, s["heads"] * head_dim)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return config, shapes


def moe_model(s):
    """DeepSeek-V2's layout (vLLM's and transformers' names), as DeepSeek-V2-Lite ships it; DeepSeek-V3's
    when the sizes name q_lora_rank and n_group (the v3 shape)."""
    v3 = "n_group" in s
    h, heads, rope = s["hidden"], s["heads"], s["qk_rope"]
    config = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": h,
        "intermediate_size": s["intermediate"], "moe_intermediate_size": s["moe_intermediate"],
        "num_hidden_layers": s["layers"], "num_attention_heads": heads, "num_key_value_heads": heads,
        "vocab_size": s["vocab"], "q_lora_rank": None, "kv_lora_rank": s["kv_lora_rank"],
        "qk_nope_head_dim": s["qk_nope"], "qk_rope_head_dim": rope, "v_head_dim": s["v_head"],
        "n_routed_experts": s["experts"], "n_shared_experts": s["shared_experts"],
        "num_experts_per_tok": s["experts_per_token"], "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "topk_method": "greedy", "n_group": None, "topk_group": None, "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    if v3:
        config.update({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                       "q_lora_rank": s["q_lora_rank"], "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                       "n_group": s["n_group"], "topk_group": s["topk_group"], "norm_topk_prob": True,
                       "routed_scaling_factor": 2.5, "rope_interleave": True,
                       "num_nextn_predict_layers": s["mtp_layers"]})

    def mlp(prefix, width):
        return [(prefix + "gate_proj.weight", (width, h)), (prefix + "up_proj.weight", (width, h)),
                (prefix + "down_proj.weight", (h, width))]

    def query(p):
        if not v3:
            return [(p + "self_attn.q_proj.weight", (heads * (s["qk_nope"] + rope), h))]
        return [(p + "self_attn.q_a_proj.weight", (s["q_lora_rank"], h)), (p + "self_attn.q_a_layernorm.weight", (s["q_lora_rank"],)),
                (p + "self_attn.q_b_proj.weight", (heads * (s["qk_nope"] + rope), s["q_lora_rank"]))]

    shapes = [("model.embed_tokens.weight", (s["vocab"], h))]
    mtp = s.get("mtp_layers", 0)
    for n in range(s["layers"] + mtp):
        p = f"model.layers.{n}."
        if n >= s["layers"]:  # a multi-token-prediction module: its own embedding, norms and head around a decoder layer
            shapes += [(p + "embed_tokens.weight", (s["vocab"], h)), (p + "enorm.weight", (h,)), (p + "hnorm.weight", (h,)),
                       (p + "eh_proj.weight", (h, 2 * h)), (p + "shared_head.norm.weight", (h,)),
                       (p + "shared_head.head.weight", (s["vocab"], h))]
        shapes += [(p + "input_layernorm.weight", (h,))] + query(p) + [
            (p + "self_attn.kv_a_proj_with_mqa.weight", (s["kv_lora_rank"] + rope, h)),
            (p + "self_attn.kv_a_layernorm.weight", (s["kv_lora_rank"],)),
            (p + "self_attn.kv_b_proj.weight", (heads * (s["qk_nope"] + s["v_head"]), s["kv_lora_rank"])),
            (p + "self_attn.o_proj.weight", (h, heads * s["v_head"])),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        if n == 0:
            shapes += mlp(p + "mlp.", s["intermediate"])
            continue
        for e in range(s["experts"]):
            shapes += mlp(p + f"mlp.experts.{e}.", s["moe_intermediate"])
        shapes += [(p + "mlp.gate.weight", (s["experts"], h))]
        if v3:  # float32 in DeepSeek's files; bf16 here (every entry is), which a loader widens
            shapes += [(p + "mlp.gate.e_score_correction_bias", (s["experts"],))]
        shapes += mlp(p + "mlp.shared_experts.", s["moe_intermediate"] * s["shared_experts"])
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return config, shapes


def qwen3_moe_model(s):
    """Qwen3-MoE's layout (transformers' and vLLM's names), as Qwen3-30B-A3B ships it: every layer sparse."""
    h, hd, heads, kv = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"]
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": h,
        "intermediate_size": s["intermediate"], "moe_intermediate_size": s["moe_intermediate"],
        "num_hidden_layers": s["layers"], "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "num_experts": s["experts"], "num_experts_per_tok": s["experts_per_token"], "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": True, "vocab_size": s["vocab"], "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": False,
        "attention_bias": False, "use_sliding_window": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
    }
    w = s["moe_intermediate"]
    shapes = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * hd, h)),
            (p + "self_attn.k_proj.weight", (kv * hd, h)),
            (p + "self_attn.v_proj.weight", (kv * hd, h)),
            (p + "self_attn.o_proj.weight", (h, heads * hd)),
            (p + "self_attn.q_norm.weight", (hd,)),
            (p + "self_attn.k_norm.weight", (hd,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate.weight", (s["experts"], h)),
        ]
        for e in range(s["experts"]):
            q = p + f"mlp.experts.{e}."
            shapes += [(q + "gate_proj.weight", (w, h)), (q + "up_proj.weight", (w, h)), (q + "down_proj.weight", (h, w))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return config, shapes


MODELS = {"dense": dense_model, "moe": moe_model, "v3": moe_model, "many": moe_model, "qwen3moe": qwen3_moe_model}
ELEMENT_BYTES = {"BF16": 2, "F8_E4M3": 1, "F32": 4}


# safetensors.save_file's order within a file: larger elements first (F32 > BF16 > F8_E4M3), then by
# name, checked against safetensors 0.7. A real block-fp8 checkpoint therefore stores every scale of
# a file together at its start, and its fp8 weights together at the end.
SAVE_FILE_RANK = {"F32": 0, "BF16": 1, "F8_E4M3": 2}


def drawn(entries, draw):
    """(name, tensor) of each entry, drawn in entries' order: an F8_E4M3 weight is a bf16 draw
    quantized in blocks, and its F32 scales (the next entry) come with it."""
    scales = None
    for name, shape, dtype in entries:
        if dtype == "F32":
            t, scales = scales, None
        elif dtype == "F8_E4M3":
            t, scales = quantize_block_fp8(draw(shape), BLOCK)
        else:
            t = draw(shape)
        yield name, t


def write_shard(path, entries, draw, save_file_order=False):
    """One safetensors file: the header first (every offset is known from the shapes), then each
    tensor's bytes as it is drawn (memory: one tensor). With `save_file_order` the file is laid out
    as safetensors.save_file lays it out (SAVE_FILE_RANK); the values are the same draws, held
    until written (memory: the shard)."""
    tensors = drawn(entries, draw)
    if save_file_order:
        held = dict(tensors)
        entries = sorted(entries, key=lambda e: (SAVE_FILE_RANK[e[2]], e[0]))
        tensors = ((name, held.pop(name)) for name, _, _ in entries)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        n = ELEMENT_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, t in tensors:
            t.cpu().contiguous().view(torch.uint8).numpy().tofile(f)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="dense")
    ap.add_argument("--layers", type=int)
    for size in ("hidden", "intermediate", "moe-intermediate", "experts", "heads", "kv-heads", "head-dim", "vocab",
                 "q-lora-rank",
                 "kv-lora-rank", "n-group", "topk-group"):
        ap.add_argument("--" + size, type=int)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-fp8", action="store_true")
    a = ap.parse_args()
    sizes = dict(SHAPES[a.shape])
    for key in sizes:
        value = getattr(a, key, None)
        if value is not None:
            sizes[key] = value
    settings = {"shape": a.shape, "sizes": sizes, "shard_gb": a.shard_gb, "seed": a.seed, "block_fp8": a.block_fp8,
                "order": "save_file" if a.block_fp8 else "model"}
    stamp = os.path.join(a.out, "bench_settings.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == settings:
        return
    os.makedirs(a.out, exist_ok=True)
    for old in os.listdir(a.out):
        if old.endswith(".safetensors") or old == "bench_settings.json":
            os.remove(os.path.join(a.out, old))
    config, shapes = MODELS[a.shape](sizes)

    # Random values drawn on the GPU where there is one (seconds instead of minutes for 8B parameters).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(a.seed)

    def draw(shape):  # on the device: a block-fp8 checkpoint quantizes there
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)

    entries = block_fp8_entries(shapes) if a.block_fp8 else [(n, shape, "BF16") for n, shape in shapes]
    limit = int(a.shard_gb * 2**30)
    shards, current, size = [], [], 0
    for name, shape, dtype in entries:
        n = ELEMENT_BYTES[dtype] * torch.Size(shape).numel()
        if current and size + n > limit and dtype != "F32":  # scales stay in their weight's file
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, dtype))
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(a.out, file), shard, draw, save_file_order=a.block_fp8)
        weight_map.update({name: file for name, _, _ in shard})
    if a.block_fp8:
        config["quantization_config"] = block_quantization_config(BLOCK)
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(a.out, "model.safetensors.index.json"), "w"))
    json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    json.dump(settings, open(stamp, "w"))


if __name__ == "__main__":
    main()
