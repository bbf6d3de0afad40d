#!/usr/bin/python3
"""Independent PyTorch forward pass of Llama / Qwen2 / Mixtral / Qwen2-MoE
models stored as Hugging Face folders, written from the Hugging Face
modelling code's definitions (not from Tessera's). Used by the C++ tests as
a reference when transformers is not installed.

    reference_forward.py MODEL_DIR IDS_JSON OUT_BIN

IDS_JSON holds [[token ids], ...] (equal lengths); OUT_BIN receives the
logits [batch, tokens, vocab] as little-endian float32.
"""
import json
import math
import os
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + begin:base + end]), dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).float()
    return out


def load_folder(d):
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    w = {}
    for f in files:
        w.update(read_safetensors(os.path.join(d, f)))
    return w


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def inv_freq(cfg, dim):
    base = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "linear":
            inv = inv / rs["factor"]
        elif kind == "llama3":
            factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
            old = rs.get("original_max_position_embeddings", 8192)
            wavelen = 2 * math.pi / inv
            new = torch.where(wavelen > old / low, inv / factor, inv)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * new / factor + smooth * new
            mid = (wavelen >= old / high) & (wavelen <= old / low)
            inv = torch.where(mid, smoothed, new)
    return inv.float()


def mlp(x, gate, up, down):
    return torch.nn.functional.silu(x @ gate.T) * (x @ up.T) @ down.T


def forward(cfg, w, ids):
    t = cfg["model_type"]
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    eps = cfg.get("rms_norm_eps", 1e-6)
    B, T = ids.shape
    x = w["model.embed_tokens.weight"][ids]
    pos = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq(cfg, hd))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def proj(name):
            out = h @ w[p + f"self_attn.{name}_proj.weight"].T
            bias = w.get(p + f"self_attn.{name}_proj.bias")
            return out + bias if bias is not None else out

        q = proj("q").view(B, T, nh, hd).transpose(1, 2)
        k = proj("k").view(B, T, nkv, hd).transpose(1, 2)
        v = proj("v").view(B, T, nkv, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + causal
        o = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        flat = h.reshape(-1, H)
        if p + "mlp.gate_proj.weight" in w:
            y = mlp(flat, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
        else:
            if t == "mixtral":
                router = w[p + "block_sparse_moe.gate.weight"]
                names = lambda j: [p + f"block_sparse_moe.experts.{j}.{n}.weight" for n in ("w1", "w3", "w2")]
                k_top, norm = cfg.get("num_experts_per_tok", 2), True
                E = cfg["num_local_experts"]
            else:
                router = w[p + "mlp.gate.weight"]
                names = lambda j: [p + f"mlp.experts.{j}.{n}_proj.weight" for n in ("gate", "up", "down")]
                k_top, norm = cfg.get("num_experts_per_tok", 4), cfg.get("norm_topk_prob", False)
                E = cfg["num_experts"]
            probs = (flat @ router.T).softmax(-1)
            topw, tope = probs.topk(k_top, dim=-1)
            if norm:
                topw = topw / topw.sum(-1, keepdim=True)
            y = torch.zeros_like(flat)
            for j in range(E):
                rows, slot = (tope == j).nonzero(as_tuple=True)
                if rows.numel():
                    y[rows] += topw[rows, slot, None] * mlp(flat[rows], *(w[n] for n in names(j)))
            if p + "mlp.shared_expert.gate_proj.weight" in w:
                shared = mlp(flat, w[p + "mlp.shared_expert.gate_proj.weight"],
                             w[p + "mlp.shared_expert.up_proj.weight"], w[p + "mlp.shared_expert.down_proj.weight"])
                y = y + torch.sigmoid(flat @ w[p + "mlp.shared_expert_gate.weight"].T) * shared
        x = x + y.view(B, T, H)
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def main():
    model_dir, ids_path, out_path = sys.argv[1:4]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    with torch.no_grad():
        w = load_folder(model_dir)
        ids = torch.tensor(json.load(open(ids_path)), dtype=torch.long)
        logits = forward(cfg, w, ids).float().contiguous()
    with open(out_path, "wb") as f:
        f.write(logits.numpy().astype("<f4").tobytes())


if __name__ == "__main__":
    main()
