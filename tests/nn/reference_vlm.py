#!/usr/bin/python3
"""Independent PyTorch / PIL reference for Tessera's vision-language models,
written from the Hugging Face definitions (SiglipVisionTransformer /
Idefics3VisionTransformer, Idefics3Connector, CLIPVisionTransformer,
LlavaMultiModalProjector, LlamaModel; PIL's Image.resize and convert, the
image processors' rescale and normalize), not from Tessera's code. Used by
tests/nn/vlm_test.cpp when transformers is not installed.

    reference_vlm.py forward MODEL_DIR IDS_JSON PIXELS_BIN OUT_PREFIX
        IDS_JSON: [[token ids], ...] (equal lengths); PIXELS_BIN: float32
        pixel values [N, C, S, S] (N from the file size). Writes
        OUT_PREFIX.features.bin (encoder features the connector takes),
        OUT_PREFIX.connector.bin (image tokens) and OUT_PREFIX.logits.bin,
        little-endian float32.
    reference_vlm.py decode IMAGE OUT_BIN
        PIL decode + convert("RGBA") + alpha_composite over white -> RGB
        bytes (height, width as two int32 first).
    reference_vlm.py resize IMAGE HEIGHT WIDTH RESAMPLE OUT_BIN
        PIL Image.resize((WIDTH, HEIGHT), RESAMPLE) of the RGB image -> bytes.
"""
import json
import math
import os
import struct
import sys

import numpy as np
import torch
from PIL import Image

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[8 + n + begin:8 + n + end]), dtype=DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"]).float()
    return out


def load_folder(d):
    index = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    w = {}
    for f in files:
        w.update(read_safetensors(os.path.join(d, f)))
    return w


def layer_norm(x, w, b, eps):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def act(x, name):
    if name == "gelu_pytorch_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(name)


def vision_encoder(vc, w, p, pixels, layers, post_norm):
    """SigLIP / Idefics3 (patch bias, no class token) or CLIP (class token,
    pre_layrnorm) vision transformer; returns hidden states after `layers`
    encoder layers."""
    clip = vc["model_type"] == "clip_vision_model"
    d, heads = vc["hidden_size"], vc["num_attention_heads"]
    eps = vc["layer_norm_eps"]
    x = torch.nn.functional.conv2d(pixels, w[p + "embeddings.patch_embedding.weight"],
                                   w.get(p + "embeddings.patch_embedding.bias"), stride=vc["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    if clip:
        cls = w[p + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
    x = x + w[p + "embeddings.position_embedding.weight"][None]
    if clip:
        x = layer_norm(x, w[p + "pre_layrnorm.weight"], w[p + "pre_layrnorm.bias"], eps)
    n, t, _ = x.shape
    hd = d // heads
    for i in range(layers):
        q = p + f"encoder.layers.{i}."
        h = layer_norm(x, w[q + "layer_norm1.weight"], w[q + "layer_norm1.bias"], eps)

        def proj(name, src):
            return src @ w[q + f"self_attn.{name}.weight"].T + w[q + f"self_attn.{name}.bias"]

        qs = proj("q_proj", h).view(n, t, heads, hd).transpose(1, 2)
        ks = proj("k_proj", h).view(n, t, heads, hd).transpose(1, 2)
        vs = proj("v_proj", h).view(n, t, heads, hd).transpose(1, 2)
        att = torch.softmax(qs @ ks.transpose(-1, -2) * hd ** -0.5, dim=-1)
        o = (att @ vs).transpose(1, 2).reshape(n, t, d)
        x = x + proj("out_proj", o)
        h = layer_norm(x, w[q + "layer_norm2.weight"], w[q + "layer_norm2.bias"], eps)
        h = act(h @ w[q + "mlp.fc1.weight"].T + w[q + "mlp.fc1.bias"], vc["hidden_act"])
        x = x + h @ w[q + "mlp.fc2.weight"].T + w[q + "mlp.fc2.bias"]
    if post_norm:
        x = layer_norm(x, w[p + "post_layernorm.weight"], w[p + "post_layernorm.bias"], eps)
    return x


def pixel_shuffle(x, s):
    bsz, seq, dim = x.size()
    side = int(seq ** 0.5)
    x = x.view(bsz, side, side, dim)
    x = x.view(bsz, side, side // s, dim * s)
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(bsz, side // s, side // s, dim * s * s)
    x = x.permute(0, 2, 1, 3)
    return x.reshape(bsz, seq // (s * s), dim * s * s)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def llama(tc, w, p, head, x):
    """LlamaModel + LM head over input embeddings x [B, T, H]."""
    nh = tc["num_attention_heads"]
    nkv = tc.get("num_key_value_heads", nh)
    hd = tc.get("head_dim") or tc["hidden_size"] // nh
    eps = tc.get("rms_norm_eps", 1e-6)
    B, T, H = x.shape
    inv = 1.0 / (tc.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(tc["num_hidden_layers"]):
        q = p + f"layers.{i}."
        h = rms_norm(x, w[q + "input_layernorm.weight"], eps)

        def proj(name):
            out = h @ w[q + f"self_attn.{name}_proj.weight"].T
            bias = w.get(q + f"self_attn.{name}_proj.bias")
            return out + bias if bias is not None else out

        qs = proj("q").view(B, T, nh, hd).transpose(1, 2)
        ks = proj("k").view(B, T, nkv, hd).transpose(1, 2)
        vs = proj("v").view(B, T, nkv, hd).transpose(1, 2)
        qs = qs * cos + rotate_half(qs) * sin
        ks = ks * cos + rotate_half(ks) * sin
        ks = ks.repeat_interleave(nh // nkv, dim=1)
        vs = vs.repeat_interleave(nh // nkv, dim=1)
        att = (qs @ ks.transpose(-1, -2)) / math.sqrt(hd) + causal
        o = (att.softmax(-1) @ vs).transpose(1, 2).reshape(B, T, nh * hd)
        x = x + o @ w[q + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[q + "post_attention_layernorm.weight"], eps)
        g = torch.nn.functional.silu(h @ w[q + "mlp.gate_proj.weight"].T) * (h @ w[q + "mlp.up_proj.weight"].T)
        x = x + g @ w[q + "mlp.down_proj.weight"].T
    x = rms_norm(x, w[p + "norm.weight"], eps)
    return x @ head.T


def forward(model_dir, ids_path, pixels_path, out_prefix):
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    w = load_folder(model_dir)
    vc, tc = cfg["vision_config"], cfg["text_config"]
    ids = torch.tensor(json.load(open(ids_path)), dtype=torch.long)
    s = vc["image_size"]
    raw = np.fromfile(pixels_path, dtype="<f4")
    pixels = torch.from_numpy(raw.copy()).view(-1, vc.get("num_channels", 3), s, s)
    if cfg["model_type"] == "llava":
        # transformers >= 4.52 names (model.language_model.*) are mapped back.
        p_vis, p_text = "vision_tower.vision_model.", "language_model.model."
        layers = vc["num_hidden_layers"]
        index = cfg.get("vision_feature_layer", -2)
        index = layers + 1 + index if index < 0 else index
        feats = vision_encoder(vc, w, p_vis, pixels, index, post_norm=False)
        if cfg.get("vision_feature_select_strategy", "default") == "default":
            feats = feats[:, 1:]
        h = act(feats @ w["multi_modal_projector.linear_1.weight"].T + w["multi_modal_projector.linear_1.bias"], "gelu")
        tokens = h @ w["multi_modal_projector.linear_2.weight"].T + w["multi_modal_projector.linear_2.bias"]
        head = w.get("language_model.lm_head.weight", w[p_text + "embed_tokens.weight"])
        image_token = cfg.get("image_token_index", 32000)
    else:
        p_vis, p_text = "model.vision_model.", "model.text_model."
        feats = vision_encoder(vc, w, p_vis, pixels, vc["num_hidden_layers"], post_norm=True)
        shuffled = pixel_shuffle(feats, cfg.get("scale_factor", 2))
        tokens = shuffled @ w["model.connector.modality_projection.proj.weight"].T
        head = w.get("lm_head.weight", w[p_text + "embed_tokens.weight"])
        image_token = cfg["image_token_id"]
    x = w[p_text + "embed_tokens.weight"][ids].clone()
    mask = ids == image_token
    assert int(mask.sum()) == tokens.shape[0] * tokens.shape[1], "placeholder count"
    x[mask] = tokens.reshape(-1, tokens.shape[-1])
    logits = llama(tc, w, p_text, head, x)
    for name, t in (("features", feats), ("connector", tokens), ("logits", logits)):
        with open(f"{out_prefix}.{name}.bin", "wb") as f:
            f.write(t.float().contiguous().numpy().astype("<f4").tobytes())


def decode_rgb(path):
    image = Image.open(path)
    image.load()
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def write_rgb(image, out):
    arr = np.asarray(image, dtype=np.uint8)
    with open(out, "wb") as f:
        f.write(struct.pack("<ii", arr.shape[0], arr.shape[1]))
        f.write(arr.tobytes())


def main():
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mode = sys.argv[1]
    with torch.no_grad():
        if mode == "forward":
            forward(*sys.argv[2:6])
        elif mode == "decode":
            write_rgb(decode_rgb(sys.argv[2]), sys.argv[3])
        elif mode == "resize":
            image = Image.open(sys.argv[2]).convert("RGB")
            h, wd, resample = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
            write_rgb(image.resize((wd, h), resample=resample), sys.argv[6])
        else:
            raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
