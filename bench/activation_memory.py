"""Activation memory of RiNALMo, measured: the bytes autograd keeps per token for the backward pass.

    python bench/activation_memory.py --preset giga --dtype bf16 --budget 16384 32768 49152 --memory-gib 80

One TransformerBlock runs forward in train mode (the preset's dropouts) on sequences of one length (no padding in
any attention backend) under `torch.autograd.graph.saved_tensors_hooks`; the distinct storages it saves
(parameters excluded) are added up per part of the block: `pre_attention` (LayerNorm, Wqkv, RoPE), the attention
call, `post_attention` (out_proj, residual dropout, LayerNorm, SwiGLU). What is saved depends on the device and
backend (the CPU's dropout keeps a mask in the activation dtype, CUDA's a bool one), so the numbers hold for the
device it runs on. For each token budget it prints the model's activation memory (blocks x bytes/token x tokens)
and, with --memory-gib, the fewest blocks to checkpoint (`model.activation_checkpointing=n`) to fit next to the
training states (--state-bytes per parameter: bf16 weights and gradients, fp32 master weights, gradients and
Adam moments under DeepSpeed bf16 ZeRO) and a reserve for the allocator, the head and the workspace.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from rnalm.config import PRESETS, ModelConfig
from rnalm.model import RiNALMo, Rotary, TransformerBlock

GIB = 2 ** 30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SavedBytes:
    """Counts the storages autograd saves inside `measure(part)` contexts, each storage once, at its first part."""

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.by_part: dict[str, int] = {}

    def measure(self, part: str):
        self.by_part.setdefault(part, 0)

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.by_part[part] += storage.nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.by_part.values())


def block_saved_bytes(cfg: ModelConfig, tokens: int, length: int, dtype: torch.dtype, device: str,
                      backend: str = "auto") -> dict[str, int]:
    """Bytes saved for backward by one block on `tokens` tokens in sequences of `length`, by part."""
    block = TransformerBlock(cfg).to(device=device, dtype=dtype).train()
    n = tokens // length
    x = torch.randn(n * length, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    rope = Rotary(cfg.head_dim, cfg.rope_base)(torch.arange(length, device=device).repeat(n))
    cu_seqlens = torch.arange(0, n * length + 1, length, device=device, dtype=torch.int32)
    saved = SavedBytes(exclude=list(block.parameters()))
    with saved.measure("pre_attention"):
        h, q, k, v = block.pre_attention(x, rope)
    with saved.measure("attention"):
        attn = block.mh_attn.attend(q, k, v, cu_seqlens, length, backend)
    with saved.measure("post_attention"):
        block.post_attention(h, attn)
    return saved.by_part


def model_saved_bytes(model: RiNALMo, run: Callable[[RiNALMo], object]) -> int:
    """Bytes saved for backward by `run(model)` (parameters excluded)."""
    saved = SavedBytes(exclude=list(model.parameters()))
    with saved.measure("model"):
        run(model)
    return saved.total


def blocks_to_checkpoint(per_token_block: float, cfg: ModelConfig, budget: int, available: float,
                         dtype_bytes: int) -> int | None:
    """Fewest checkpointed blocks whose activations fit `available` bytes; None if even all do not.

    A checkpointed block keeps only its input (dim values per token). The peak is the end of the forward pass,
    or, in the backward pass, a checkpointed block recomputing its activations once the blocks after it have
    freed theirs (the first n blocks are the checkpointed ones)."""
    full, kept, layers = per_token_block * budget, cfg.dim * dtype_bytes * budget, cfg.num_layers
    for n in range(layers + 1):
        if max((layers - n) * full + n * kept, (n - 1) * kept + full if n else 0) <= available:
            return n
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="giga")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--attn-dropout", type=float,
                    help="default: the preset's (0.1); applied on a GPU by flash-attn, not by torch_varlen")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the measured block's batch")
    ap.add_argument("--length", type=int, default=128, help="length of every sequence (corpus mean ~120)")
    ap.add_argument("--budget", type=int, nargs="+", default=[16384, 32768, 49152])
    ap.add_argument("--memory-gib", type=float,
                    help="device memory, to pick the blocks to checkpoint (default on CUDA: the GPU's)")
    ap.add_argument("--state-bytes", type=float, default=20.0, help="training-state bytes per parameter")
    ap.add_argument("--reserve-gib", type=float, default=6.0)
    ap.add_argument("--out")
    args = ap.parse_args()

    if args.memory_gib is None and args.device.startswith("cuda"):
        args.memory_gib = torch.cuda.get_device_properties(args.device).total_memory / GIB
    cfg = ModelConfig.preset(args.preset, **({} if args.attn_dropout is None else {"attn_dropout": args.attn_dropout}))
    dtype = DTYPES[args.dtype]
    by_part = block_saved_bytes(cfg, args.tokens, args.length, dtype, args.device, args.backend)
    tokens = args.tokens // args.length * args.length
    per_token = sum(by_part.values()) / tokens
    with torch.device("meta"):
        states = RiNALMo(cfg).num_parameters() * args.state_bytes
    result = {"preset": args.preset, "dtype": args.dtype, "device": args.device, "tokens": tokens,
              "length": args.length, "bytes_per_token_per_block": per_token,
              "by_part_per_token": {k: v / tokens for k, v in by_part.items()}, "budgets": []}
    print(f"{args.preset} {args.dtype} on {args.device}: {per_token / 1e3:.1f} KB per token per block ("
          + ", ".join(f"{k} {v / tokens / 1e3:.1f}" for k, v in by_part.items()) + ")")
    for budget in args.budget:
        row = {"budget": budget, "activations_gib": per_token * budget * cfg.num_layers / GIB}
        line = f"  budget {budget}: activations {row['activations_gib']:.1f} GiB for {cfg.num_layers} blocks"
        if args.memory_gib:
            available = (args.memory_gib - args.reserve_gib) * GIB - states
            n = blocks_to_checkpoint(per_token, cfg, budget, available, dtype.itemsize)
            row.update(states_gib=states / GIB, checkpointed_blocks=n)
            line += (f"; with {states / GIB:.1f} GiB of states in {args.memory_gib:g} GiB "
                     f"({args.reserve_gib:g} reserved): " + ("does not fit" if n is None else
                                                             f"activation_checkpointing={n}"))
        result["budgets"].append(row)
        print(line)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
