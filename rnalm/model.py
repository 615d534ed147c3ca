"""The exact RiNALMo architecture, for packed (varlen) and padded batches.

Module and parameter names equal the original state-dict keys, so its weights load unchanged.
Quirks kept on purpose (see ../shared/notes/rinalmo_facts.md §1): token dropout is active in eval mode too;
the attention residual is added to LayerNorm(x), not to x; SwiGLU has a learnable beta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rnalm.attention import varlen_attention
from rnalm.batch import PackedBatch, pad, positions_from_cu_seqlens, unpad
from rnalm.config import ModelConfig
from rnalm.tokenizer import MASK_ID, PAD_ID


@dataclass
class ModelOutput:
    logits: torch.Tensor          # [T, V] packed (or rows of logits_index), [B, L, V] padded
    representation: torch.Tensor  # [T, D] packed, [B, L, D] padded (zeros at padding)


class Rotary(nn.Module):
    """GPT-NeoX style (rotate-half) RoPE over the full head dim; positions given per token.

    The frequencies are computed in fp32 at each call rather than kept as a buffer: `model.bfloat16()` (what
    DeepSpeed's bf16 mode does) would round a buffer to bf16 (0.4% off), so a model trained that way would rotate
    differently from the same weights run in fp32 (cos off by up to 0.18 within 1024 positions).
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each token's angles, [T, 1, Dh / 2] in fp32 (a pair (i, i + Dh / 2) shares angle i)."""
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        angles = (positions.float()[:, None] * (1.0 / self.base ** exponents)[None, :])[:, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, H, Dh] in fp32 and return it in x's dtype (flash-attn's rotary kernel first rounds cos and sin to
    x's dtype: at most 2^-9 relative apart)."""
    return RotateHalf.apply(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x1 cos - x2 sin, x2 cos + x1 sin for the halves x1, x2 of the last dim: in fp32, rounded once to x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # dynamo refuses out= into views; inductor fuses this form into one kernel
        x1, x2 = x1.float(), x2.float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    torch.addcmul(x1 * cos, x2, sin, value=-1, out=out1)
    torch.addcmul(x2 * cos, x1, sin, out=out2)
    return out


class RotateHalf(torch.autograd.Function):
    """The rotation as two passes per half (a product, then an addcmul written into the output in x's dtype);
    autograd's form (upcast, negate, concatenate, two products, sum, downcast, and the same backward) made RoPE
    8.8 of the 21.7 GB a giga block moves outside its matmuls in eager mode (bench/block_traffic.py, 32k tokens).
    The backward is the inverse rotation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


GEMM_ALIGNMENT = 16   # bytes: what cuBLAS's fast (TMA/vectorised) GEMM kernels need of every operand's address


@torch.library.custom_op("rnalm::aligned_copy", mutates_args=())
def aligned_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy in fresh (aligned) memory that torch.compile keeps: inductor removes a plain clone as a no-op."""
    return t.clone()


aligned_copy.register_fake(lambda t: torch.empty_like(t))
aligned_copy.register_autograd(lambda ctx, grad: grad)


def gemm_operand(t: torch.Tensor | None) -> torch.Tensor | None:
    """t where its data starts 16-byte aligned, else an aligned copy (gradients flow back to t).

    DeepSpeed keeps parameters as views into flat buffers at any element offset: under the trainer's ZeRO-2 and
    ZeRO-3 every bias past the first 3413-element FFN bias or 1-element SwiGLU beta starts 2-14 bytes off a
    16-byte boundary (bench/gemm_alignment.py). cuBLAS runs unaligned operands on slow kernels, and inductor's
    addmm with such a bias stopped a ZeRO-2 + torch.compile run on an H200 with 'misaligned address'
    (BENCHMARKS.md). Compiled code cannot branch on an address, so there every operand is copied (aligned_copy;
    giga: ~1.3 GB of bf16 weights per forward, ~1 ms, and the copies kept for the backward)."""
    if t is None:
        return t
    if torch.compiler.is_compiling():
        return aligned_copy(t)
    return t.clone() if t.data_ptr() % GEMM_ALIGNMENT else t


class AlignedLinear(nn.Linear):
    """nn.Linear (same parameters and names) whose GEMM operands are 16-byte aligned (gemm_operand) and whose
    matmul may run wider than its weight: `out_pad` extra zero output rows, and `in_pad` zero input columns for
    an input that wide. Exact: the extra outputs are 0 and the extra inputs meet zero weights; their gradients never
    reach a parameter. Why wider: the original FFN width (3413 for giga) gives rows of 6826 bytes, not a multiple
    of 16, which keeps GPU GEMMs off their aligned (TMA) kernels."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, out_pad: int = 0,
                 in_pad: int = 0) -> None:
        super().__init__(in_features, out_features, bias)
        self.out_pad, self.in_pad = out_pad, in_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_pad = self.in_pad
        if x.shape[-1] != self.in_features + in_pad:  # F.pad would crop the weight, or ignore the extra inputs
            raise ValueError(f"input of width {x.shape[-1]} into a linear layer of {self.in_features} inputs"
                             + (f" (+{in_pad} zero columns)" if in_pad else ""))
        # a real pad writes a fresh tensor; a zero pad is a no-op that inductor removes
        weight = F.pad(self.weight, (0, in_pad, 0, self.out_pad)) if in_pad or self.out_pad else \
            gemm_operand(self.weight)
        bias = F.pad(self.bias, (0, self.out_pad)) if self.out_pad and self.bias is not None else \
            gemm_operand(self.bias)
        return F.linear(x, weight, bias)


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = cfg.num_heads, cfg.head_dim, cfg.attn_dropout
        self.Wqkv = AlignedLinear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out_proj = AlignedLinear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor,
                max_seqlen: int, backend: str) -> torch.Tensor:
        return self.out_proj(self.attend(*self.qkv(x, rope), cu_seqlens, max_seqlen, backend))

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Rotated q, k and v, each [T, H, Dh]."""
        q, k, v = self.Wqkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
               backend: str) -> torch.Tensor:
        """Varlen attention, heads merged: [T, D] (before out_proj)."""
        dropout = self.dropout if self.training else 0.0
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout, backend).reshape(q.shape[0], -1)


class SwishGate(torch.autograd.Function):
    """a * sigmoid(beta * a) * gate that keeps only a and gate for the backward pass and recomputes the sigmoid.

    Autograd would keep four [T, ffn] tensors (a, the sigmoid, a * sigmoid, gate): with the output that the next
    Linear keeps, the largest share of a block's activation memory (bench/activation_memory.py)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, gate: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, gate, beta)
        return a * torch.sigmoid(beta * a) * gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, gate, beta = ctx.saved_tensors
        s = (beta * a).sigmoid_()
        swish = a * s
        grad_gate = grad * swish
        grad_swish = grad * gate
        t = swish.mul_(1 - s)              # a s (1 - s): d swish / da = s + beta t, d swish / d beta = a t
        grad_beta = torch.vdot((grad_swish * t).flatten(), a.flatten().to(t.dtype)).reshape(beta.shape)
        grad_a = grad_swish.mul_(s.addcmul_(t, beta))
        return grad_a.to(a.dtype), grad_gate.to(gate.dtype), grad_beta.to(beta.dtype)


class SwiGLU(nn.Module):
    """a * sigmoid(beta * a) * gate, with a = linear(x), gate = linear_gate(x) and a learnable beta.
    `width` >= hidden: the width the matmuls and the output have (zeros beyond hidden; ModelConfig.ffn_align)."""

    def __init__(self, dim: int, hidden: int, width: int | None = None) -> None:
        super().__init__()
        pad = (width or hidden) - hidden
        self.linear = AlignedLinear(dim, hidden, out_pad=pad)
        self.linear_gate = AlignedLinear(dim, hidden, out_pad=pad)
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SwishGate.apply(self.linear(x), self.linear_gate(x), self.beta)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.mh_attn = MultiHeadSelfAttention(cfg)
        self.attn_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn_dropout = nn.Dropout(cfg.residual_dropout)
        self.transition = nn.Sequential(SwiGLU(cfg.dim, cfg.ffn_dim, cfg.ffn_width),
                                        nn.Dropout(cfg.transition_dropout),
                                        AlignedLinear(cfg.ffn_dim, cfg.dim, in_pad=cfg.ffn_width - cfg.ffn_dim))
        self.out_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.transition_dropout = nn.Dropout(cfg.residual_dropout)

    def forward(self, x, rope, cu_seqlens, max_seqlen, backend):
        h, q, k, v = self.pre_attention(x, rope)
        return self.post_attention(h, self.mh_attn.attend(q, k, v, cu_seqlens, max_seqlen, backend))

    # The block split around attention: these two parts see only [T, ...] tensors, so with a fixed token
    # count they compile to static shapes (compile_blocks); attention keeps the varying cu_seqlens/max_seqlen.
    def pre_attention(self, x, rope):
        h = self.attn_layer_norm(x)
        return (h, *self.mh_attn.qkv(h, rope))

    def post_attention(self, h, attn):
        h = h + self.attn_dropout(self.mh_attn.out_proj(attn))
        return h + self.transition_dropout(self.transition(self.out_layer_norm(h)))

    def compile_parts(self, **kwargs) -> None:
        """torch.compile the parts around attention (kwargs go to torch.compile, e.g. dynamic=False)."""
        self.pre_attention = torch.compile(self.pre_attention, **kwargs)
        self.post_attention = torch.compile(self.post_attention, **kwargs)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        # The first blocks, not the last: when the backward pass reaches them the later blocks' activations are
        # freed, so their recomputation never adds to the peak held at the end of the forward pass.
        self.checkpointed_blocks = cfg.checkpointed_blocks

    def forward(self, x, positions, cu_seqlens, max_seqlen, backend):
        rope = self.rotary(positions)
        for i, block in enumerate(self.blocks):
            if i < self.checkpointed_blocks and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, cu_seqlens, max_seqlen, backend, use_reentrant=False)
            else:
                x = block(x, rope, cu_seqlens, max_seqlen, backend)
        return self.final_layer_norm(x)


class MaskedLanguageModelHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear1 = AlignedLinear(cfg.dim, cfg.dim)
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.linear2 = AlignedLinear(cfg.dim, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.layer_norm(F.gelu(self.linear1(x))))


class RiNALMo(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.attention_backend = cfg.attention_backend   # swappable at run time, e.g. "sdpa"
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=PAD_ID)
        self.transformer = Transformer(cfg)
        self.lm_mask_head = MaskedLanguageModelHead(cfg)

    def embed(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Embeddings with ESM-2 token dropout: zero <mask> rows, rescale per sequence (eval mode too)."""
        x = self.embedding(tokens)
        if not self.config.token_dropout:
            return x
        is_mask = tokens == MASK_ID
        x = x.masked_fill(is_mask[:, None], 0.0)
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel(), device=tokens.device), lengths,
                                               output_size=tokens.numel())
        masks = torch.zeros(lengths.numel(), device=tokens.device).index_add_(0, seq_of_token, is_mask.float())
        scale = (1 - self.config.mask_ratio_train) / (1 - masks / lengths)
        return x * scale[seq_of_token, None].to(x.dtype)

    @property
    def applies_attention_dropout(self) -> bool:
        return self.training and self.config.attn_dropout > 0

    def forward_packed(self, batch: PackedBatch, logits_index: torch.Tensor | None = None) -> ModelOutput:
        x = self.embed(batch.tokens, batch.cu_seqlens)
        # "auto" is resolved at each attention call, where the dtype (fp32, or autocast's) is known
        rep = self.transformer(x, batch.positions, batch.cu_seqlens, batch.max_seqlen, self.attention_backend)
        head_in = rep if logits_index is None else rep[logits_index]
        return ModelOutput(logits=self.lm_mask_head(head_in), representation=rep)

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        """Padded [B, L] input (right padding with <pad>); unpads, runs packed, pads back."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens: want [batch, length] ids, got shape {tuple(tokens.shape)}")
        index, flat, cu_seqlens, max_seqlen = unpad(tokens)
        if flat.numel() == 0:
            raise ValueError(f"tokens {tuple(tokens.shape)}: no token that is not <pad>")
        batch = PackedBatch(tokens=flat, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                            positions=positions_from_cu_seqlens(cu_seqlens))
        out = self.forward_packed(batch)
        b, length = tokens.shape
        return ModelOutput(logits=pad(out.logits, index, b, length),
                           representation=pad(out.representation, index, b, length))

    def compile_blocks(self, dynamic: bool = False) -> "RiNALMo":
        """torch.compile every transformer block around its attention call (static shapes by default: feed
        batches of one token count, e.g. pretrain's budget padding). Parameter names are unchanged."""
        for block in self.transformer.blocks:
            block.compile_parts(dynamic=dynamic)
        return self

    def num_parameters(self, include_head: bool = True, include_embedding: bool = True) -> int:
        total = 0
        for name, p in self.named_parameters():
            if (name.startswith("lm_mask_head") and not include_head) or \
               (name.startswith("embedding") and not include_embedding):
                continue
            total += p.numel()
        return total

    def flops_per_token(self, seqlen: float, head_fraction: float = 1.0) -> float:
        """Training FLOPs (forward + backward) per token of a sequence of `seqlen` tokens.

        6 x matmul parameters (encoder without the embedding lookup, plus the MLM head for the
        fraction of tokens it runs on) + 12 x layers x dim x seqlen for the attention scores and values.
        """
        cfg = self.config
        encoder = self.num_parameters(include_head=False, include_embedding=False)
        head = self.num_parameters() - self.num_parameters(include_head=False)
        return 6.0 * (encoder + head_fraction * head) + 12.0 * cfg.num_layers * cfg.dim * seqlen

    def training_flops(self, lengths: torch.Tensor, head_fraction: float = 1.0) -> float:
        """Training FLOPs of one forward + backward over sequences of these (real) lengths."""
        lengths = lengths.double()
        base = self.flops_per_token(0, head_fraction)
        per_len = self.flops_per_token(1, head_fraction) - base
        return float(base * lengths.sum() + per_len * lengths.square().sum())
