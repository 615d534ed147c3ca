"""Where an eager training step's time goes, on paper: one TransformerBlock forward + backward on the meta device
(no data, no compute, any token count) with every aten op recorded.

    python bench/block_traffic.py --preset giga --tokens 32768 --out block_traffic.json

Matmuls count FLOPs (2 m n k). Every other op that reads or writes data counts the bytes of all its tensor inputs
and outputs; views and allocations are free. In eager mode each such op is a kernel that goes through HBM, so the
bytes are the block's memory traffic outside the matmuls: what torch.compile's fusion can cut. The attention call
is left out (its own kernel; its FLOPs are in pretrain.mfu's formula), and dropout counts as CUDA's one-kernel
native_dropout, not the meta/CPU composite. Estimate for the model's blocks: FLOPs / --matmul-tflops + bytes /
--hbm-tbps, a lower bound on eager time (the embedding, head, optimizer and host gaps come on top).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_bench import write_result  # noqa: E402
from rnalm.config import ModelConfig  # noqa: E402
from rnalm.model import Rotary, TransformerBlock  # noqa: E402

FREE = frozenset({"view", "_unsafe_view", "reshape", "t", "transpose", "unbind", "split", "split_with_sizes", "slice",
                  "select", "expand", "as_strided", "detach", "unsqueeze", "squeeze", "permute", "alias", "narrow",
                  "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
                  "ones_like", "lift_fresh", "_reshape_alias"})


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.matmul_flops = 0
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm"):  # the block's only matmuls: [m, k] @ [k, n] (+ bias)
            a, b = args[-2:]
            self.matmul_flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            self.calls["matmul"] += 1
        elif name.rstrip("_") not in FREE:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
            self.calls[name] += 1
        return out


class NoAttention(torch.autograd.Function):
    """Attention's output shape, without its work: counted apart (pretrain.mfu)."""

    @staticmethod
    def forward(ctx, q, k, v):
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, grad):
        return torch.empty_like(grad), torch.empty_like(grad), torch.empty_like(grad)


def cuda_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    return torch.native_dropout(x, p, training)[0] if training and p > 0 else x


def count_block(cfg: ModelConfig, tokens: int, dtype: torch.dtype = torch.bfloat16) -> OpCounter:
    """One block's forward + backward (train mode: the config's dropouts) on `tokens` tokens."""
    with torch.device("meta"):
        block = TransformerBlock(cfg).to(dtype).train()
        x = torch.empty(tokens, cfg.dim, dtype=dtype, requires_grad=True)
        rope = Rotary(cfg.head_dim, cfg.rope_base)(torch.arange(tokens))
    block.mh_attn.attend = lambda q, k, v, *_: NoAttention.apply(q, k, v).reshape(q.shape[0], -1)
    counter = OpCounter()
    with mock.patch.object(F, "dropout", cuda_dropout), counter:
        block(x, rope, None, 0, "sdpa").backward(torch.empty(tokens, cfg.dim, dtype=dtype, device="meta"))
    return counter


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="giga")
    ap.add_argument("--tokens", type=int, default=32768, help="tokens per micro-batch (the token budget)")
    ap.add_argument("--ffn-align", type=int, default=ModelConfig.ffn_align)
    ap.add_argument("--matmul-tflops", type=float, default=650.0, help="bf16 GEMM rate reached (H100/H200: ~650)")
    ap.add_argument("--hbm-tbps", type=float, default=3.5, help="memory bandwidth reached by elementwise kernels")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cfg = ModelConfig.preset(args.preset, ffn_align=args.ffn_align)
    c = count_block(cfg, args.tokens)
    traffic = sum(c.bytes.values())
    layers = cfg.num_layers
    result = {"preset": args.preset, "tokens": args.tokens, "ffn_width": cfg.ffn_width, "layers": layers,
              "block_matmul_tflop": c.matmul_flops / 1e12, "block_other_gb": traffic / 1e9,
              "other_bytes_per_token": traffic / args.tokens,
              "step_matmul_s": layers * c.matmul_flops / (args.matmul_tflops * 1e12),
              "step_other_s": layers * traffic / (args.hbm_tbps * 1e12),
              "matmul_tflops": args.matmul_tflops, "hbm_tbps": args.hbm_tbps,
              "ops": [{"op": op, "gb": b / 1e9, "calls": c.calls[op]} for op, b in c.bytes.most_common()]}
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
