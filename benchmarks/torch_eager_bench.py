#!/usr/bin/python3
"""PyTorch-eager side of benchmarks/model_bench.cpp: the same model (a
Hugging Face folder written by the C++ side), the same shapes, the same
thread count, Debian's PyTorch on the same LibTorch and BLAS.

    torch_eager_bench.py MODEL_DIR JSON_ARGS   -> prints one JSON line

JSON_ARGS: {"threads": 2, "train_batch": 8, "train_seq": 128, "train_steps": 20,
            "warmup": 1, "gen_batches": [1, 16], "gen_calls": 3, "prompt_len": 16,
            "new_tokens": 32}

Written as a careful eager user would: training is forward + cross-entropy +
backward + gradient clipping + AdamW (foreach), `warmup` untimed steps then
`train_steps` timed ones, each timed alone; generation is greedy with a KV
cache preallocated for the whole sequence, `warmup` untimed then `gen_calls`
timed calls per batch size. The JSON line holds every step's and call's
seconds ("train_step_seconds", "gen_b<B>_seconds") and the tokens each
counts ("train_tokens_per_step", "gen_b<B>_tokens").
"""
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "nn"))
import reference_forward as ref  # noqa: E402


def forward_cached(cfg, w, ids, cache, start):
    """Dense Llama/Qwen2 forward of ids [B, T] at positions start.., appending to cache."""
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    B, T = ids.shape
    x = w["model.embed_tokens.weight"][ids]
    pos = torch.arange(start, start + T, dtype=torch.float32)
    freqs = torch.outer(pos, ref.inv_freq(cfg, hd))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    L = start + T
    mask = torch.full((T, L), float("-inf")).triu(start + 1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = ref.rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(B, T, nh, hd).transpose(1, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + ref.rotate_half(q) * sin
        k = k * cos + ref.rotate_half(k) * sin
        kc, vc = cache[layer]
        kc[:, :, start:L] = k
        vc[:, :, start:L] = v
        k = kc[:, :, :L].repeat_interleave(nh // nkv, dim=1)
        v = vc[:, :, :L].repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = ref.rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + ref.mlp(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
    x = ref.rms_norm(x[:, -1:], w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def main():
    model_dir, args = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(args["threads"])
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    w = ref.load_folder(model_dir)
    out = {"threads": torch.get_num_threads()}
    V = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)

    # Training: forward + backward + AdamW, as the C++ Trainer does.
    warmup = args.get("warmup", 1)
    if args.get("train_steps", 0) > 0:
        params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
        opt = torch.optim.AdamW(params.values(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                foreach=True)
        B, T = args["train_batch"], args["train_seq"]
        times = []
        for step in range(warmup + args["train_steps"]):
            ids = torch.randint(0, V, (B, T + 1), generator=g)
            t0 = time.perf_counter()
            logits = ref.forward(cfg, params, ids[:, :T])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
        out["train_step_seconds"] = times
        out["train_tokens_per_step"] = B * T

    # Generation with a preallocated KV cache, greedy.
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    with torch.no_grad():
        for B in args["gen_batches"]:
            P, N = args["prompt_len"], args["new_tokens"]
            times = []
            for call in range(warmup + args.get("gen_calls", 3)):
                cache = [(torch.zeros(B, nkv, P + N, hd), torch.zeros(B, nkv, P + N, hd))
                         for _ in range(cfg["num_hidden_layers"])]
                ids = torch.randint(0, V, (B, P), generator=g)
                t0 = time.perf_counter()
                nxt = forward_cached(cfg, w, ids, cache, 0).argmax(-1)
                for i in range(1, N):
                    nxt = forward_cached(cfg, w, nxt, cache, P + i - 1).argmax(-1)
                if call >= warmup:
                    times.append(time.perf_counter() - t0)
            out[f"gen_b{B}_seconds"] = times
            out[f"gen_b{B}_tokens"] = B * N
    out["torch"] = torch.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
