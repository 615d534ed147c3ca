"""Variable-length (packed) self-attention behind one function, with swappable backends.

All backends take q, k, v of shape [T, H, Dh] for packed sequences delimited by int32 `cu_seqlens`
and attend only within each sequence (non-causal, scale 1/sqrt(Dh)).
- torch_varlen: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA). It has no
  attention-probability dropout, so that dropout is not applied with this backend.
- flash_attn: `flash_attn_varlen_func` when flash-attn is installed (CUDA), with dropout.
- sdpa: pads to [B, H, Lmax, Dh] and calls scaled_dot_product_attention with a key-padding mask;
  runs anywhere (the CPU path).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p > 0:
        _warn_once("torch varlen_attn has no attention-probability dropout; it is not applied")
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p=dropout_p, causal=False)


def _sdpa(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths, output_size=total)
    slot = seq_of_token * max_seqlen + (torch.arange(total, device=q.device) - cu[seq_of_token])

    def to_padded(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(batch * max_seqlen, heads, head_dim)
        out[slot] = x
        return out.view(batch, max_seqlen, heads, head_dim).transpose(1, 2)

    key_ok = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v),
                                         attn_mask=key_ok[:, None, None, :], dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(batch * max_seqlen, heads, head_dim)[slot]


BACKENDS: dict[str, AttentionFn] = {"torch_varlen": _torch_varlen, "flash_attn": _flash_attn, "sdpa": _sdpa}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None and torch.cuda.is_available()


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, fastest first."""
    return list(_available_backends(torch.device(device).type))


@functools.lru_cache(maxsize=None)
def _available_backends(device_type: str) -> tuple[str, ...]:
    names: list[str] = []
    if device_type == "cuda":
        if torch_varlen_available():
            names.append("torch_varlen")
        if flash_attn_available():
            names.append("flash_attn")
    return (*names, "sdpa")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """'auto' picks the fastest backend for the device; an explicit name must be available there."""
    options = available_backends(device)
    if name == "auto":
        return options[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {['auto', *BACKENDS]}")
    if name not in options:
        raise RuntimeError(f"attention backend {name!r} is not available on {device}; available: {options}")
    return name


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    return BACKENDS[resolve_backend(backend, q.device)](q, k, v, cu_seqlens, max_seqlen, dropout_p)
