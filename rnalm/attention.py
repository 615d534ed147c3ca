"""Variable-length (packed) self-attention behind one function, with swappable backends.

All backends take q, k, v of shape [T, H, Dh] for packed sequences delimited by int32 `cu_seqlens`
and attend only within each sequence (non-causal, scale 1/sqrt(Dh)).
- torch_varlen: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA). It has no
  attention-probability dropout, so that dropout is not applied with this backend.
- flash_attn: `flash_attn_varlen_func` when flash-attn is installed (CUDA), with dropout.
- torch_flash: the FlashAttention kernel varlen_attn runs, called directly as torch's (private) aten op, which
  takes a dropout probability and whose autograd keeps the dropout's RNG state for the backward pass (CUDA, where
  a tiny forward + backward with dropout runs once at the first use).
  When the model trains with attention dropout, "auto" takes the first of flash_attn and torch_flash over
  torch_varlen (the same kernels, plus the dropout).
- sdpa: pads groups of similar-length sequences to [b, H, Lmax_group, Dh] and calls
  scaled_dot_product_attention with a key-padding mask; runs anywhere (the CPU path).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rnalm.config import ATTENTION_BACKENDS

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


def _torch_flash(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    return torch.ops.aten._flash_attention_forward.default(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                           dropout_p, False, False)[0]  # not causal, no debug mask


def _sdpa(q, k, v, cu_seqlens, max_seqlen, dropout_p):
    """Sequences of similar length (within a factor sqrt(2)) padded together, one SDPA call per group: the
    padded score matrices stay within 2x of sum(L_i^2) instead of B * Lmax^2, which in a packed batch of many
    short sequences and one long crop is ~30x more (the math kernel, the only one with dropout, keeps them)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    group_of_seq = torch.floor(2 * torch.log2(lengths.clamp(min=1).double())).long()
    outs, rows = [], []
    group_of_seq[lengths == 0] = -1                                        # empty sequences: nothing to attend
    for group in torch.unique(group_of_seq[group_of_seq >= 0]).tolist():
        seqs = (group_of_seq == group).nonzero().squeeze(1)
        lens = lengths[seqs]
        longest = int(lens.max())
        pos = torch.arange(longest, device=q.device)
        valid = pos[None, :] < lens[:, None]                              # [b, longest]
        # pad slots (masked) repeat the sequence's own last row: another's could be inf/NaN, which a mask lets through
        token = cu[seqs][:, None] + torch.minimum(pos[None, :], lens[:, None] - 1)
        qb, kb, vb = (x[token].transpose(1, 2) for x in (q, k, v))         # [b, H, longest, Dh]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid[:, None, None, :], dropout_p=dropout_p)
        outs.append(out.transpose(1, 2)[valid])
        rows.append(token[valid])
    return torch.zeros_like(q).index_copy(0, torch.cat(rows), torch.cat(outs))


BACKENDS: dict[str, AttentionFn] = {"torch_varlen": _torch_varlen, "flash_attn": _flash_attn,
                                    "torch_flash": _torch_flash, "sdpa": _sdpa}
WITHOUT_DROPOUT = frozenset({"torch_varlen"})
# The CUDA varlen kernels (flash-attn's, and torch's FlashAttention/cuDNN ones) reject any other input dtype.
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16})
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None and torch.cuda.is_available()


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def torch_flash_works(device: torch.device | str) -> bool:
    """torch_flash runs forward and backward with dropout on `device` (a private op: a torch without it, or a GPU
    its kernel does not support, leaves the other backends, with a warning)."""
    device = torch.device(device)
    try:
        # Unseen by the caller: its random streams (a resumed run replays its dropout masks from saved RNG states),
        # an enclosing activation checkpoint (whose hooks count the tensors a block saves, and a recomputed block
        # finds the answer cached), an evaluation's no_grad or inference mode.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), \
                torch.inference_mode(False), torch.enable_grad():
            x = torch.full((8, 1, 64), 0.5, device=device, dtype=torch.bfloat16, requires_grad=True)
            _torch_flash(x, x, x, torch.tensor([0, 8], device=device, dtype=torch.int32), 8, 0.1).sum().backward()
        return True
    except (RuntimeError, TypeError, AttributeError) as e:  # NotImplementedError is a RuntimeError
        _warn_once(f"torch_flash attention does not run on {device} ({type(e).__name__}: {e}); attention dropout "
                   "needs flash-attn there")
        return False


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on `device`, fastest first."""
    device = torch.device(device)
    names = list(_available_backends(device.type))
    if device.type == "cuda" and torch.cuda.is_available() and _torch_flash_runs(
            torch.device("cuda", torch.cuda.current_device()) if device.index is None else device):
        names.insert(-1, "torch_flash")  # probed on this GPU (not on GPU 0: no CUDA context there for it)
    return names


@functools.lru_cache(maxsize=None)
def _torch_flash_runs(device: torch.device) -> bool:
    return torch_flash_works(device)


@functools.lru_cache(maxsize=None)
def _available_backends(device_type: str) -> tuple[str, ...]:
    names: list[str] = []
    if device_type == "cuda":
        if torch_varlen_available():
            names.append("torch_varlen")
        if flash_attn_available():
            names.append("flash_attn")
    return (*names, "sdpa")


def resolve_backend(name: str, device: torch.device | str, dropout: bool = False,
                    dtype: torch.dtype | None = None) -> str:
    """'auto' picks the fastest backend for the device, with `dropout` the fastest that applies attention dropout
    unless only the sdpa fallback would, and sdpa for inputs of a `dtype` the CUDA kernels lack (fp32 without
    autocast); an explicit name must be available there, and gives such inputs to sdpa too, with a warning (a
    fine-tune naming its training kernel validates in fp32)."""
    if name != "auto":
        options = available_backends(device)
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from {list(ATTENTION_BACKENDS)}")
        if name not in options:
            raise RuntimeError(f"attention backend {name!r} is not available on {device}; available: {options}")
    if dtype is not None and dtype not in KERNEL_DTYPES:
        if name not in ("auto", "sdpa"):
            _warn_once(f"attention backend {name!r} takes fp16/bf16 inputs only; {dtype} ones (no autocast) run on "
                       "sdpa")
        return "sdpa"
    if name != "auto":
        return name
    device = torch.device(device)
    fast = [b for b in _available_backends(device.type) if b != "sdpa" and not (dropout and b in WITHOUT_DROPOUT)]
    if fast:  # torch_flash, which needs a probe on the GPU, only where no other kernel serves
        return fast[0]
    kernels = [b for b in available_backends(device) if b != "sdpa"]
    with_dropout = [b for b in kernels if b not in WITHOUT_DROPOUT]
    return (with_dropout if dropout and with_dropout else kernels or ["sdpa"])[0]


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    backend = resolve_backend(backend, q.device, dropout_p > 0, q.dtype)
    return BACKENDS[backend](q, k, v, cu_seqlens, max_seqlen, dropout_p)
