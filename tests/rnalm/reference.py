"""A plain float64 re-statement of the original RiNALMo forward, straight from its state dict.

Written independently of rnalm.model from notes/rinalmo_facts.md §1 (padded batch, explicit
softmax over a key-padding mask, RoPE from cos/sin tables), so tests compare two implementations.
"""
from __future__ import annotations

import math

import torch

PAD, MASK = 1, 4


def _layer_norm(x, sd, prefix):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def _rope(x, length):  # x [B, L, H, Dh]
    dh = x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    half = dh // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def reference_forward(sd: dict, tokens: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits and representation [B, L, *] for padded tokens, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    b, length = tokens.shape
    pad = tokens == PAD
    x = sd["embedding.weight"][tokens]
    masked = tokens == MASK
    x = x.masked_fill(masked[..., None], 0.0)
    ratio = masked.sum(-1) / (~pad).sum(-1)
    x = x * (1 - 0.15 * 0.8) / (1 - ratio)[:, None, None]
    num_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.blocks."))
    dim = x.shape[-1]
    dh = dim // num_heads
    for i in range(num_layers):
        p = f"transformer.blocks.{i}."
        h = _layer_norm(x, sd, p + "attn_layer_norm")
        q, k, v = (h @ sd[p + "mh_attn.Wqkv.weight"].T).view(b, length, 3, num_heads, dh).unbind(2)
        q, k = _rope(q, length), _rope(k, length)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, length, dim)
        h = h + attn @ sd[p + "mh_attn.out_proj.weight"].T
        g = _layer_norm(h, sd, p + "out_layer_norm")
        a = g @ sd[p + "transition.0.linear.weight"].T + sd[p + "transition.0.linear.bias"]
        gate = g @ sd[p + "transition.0.linear_gate.weight"].T + sd[p + "transition.0.linear_gate.bias"]
        ffn = a * torch.sigmoid(sd[p + "transition.0.beta"] * a) * gate
        x = h + ffn @ sd[p + "transition.2.weight"].T + sd[p + "transition.2.bias"]
    rep = _layer_norm(x, sd, "transformer.final_layer_norm")
    y = torch.nn.functional.gelu(rep @ sd["lm_mask_head.linear1.weight"].T + sd["lm_mask_head.linear1.bias"])
    y = _layer_norm(y, sd, "lm_mask_head.layer_norm")
    logits = y @ sd["lm_mask_head.linear2.weight"].T + sd["lm_mask_head.linear2.bias"]
    return logits, rep
