"""Downstream heads of the original RiNALMo.

Only the secondary-structure head keeps the original's parameter names (its released weights load 1:1, see
`import_original_ss`). The splice and MRL heads have other names (original: `classifier.{0,2}`,
`resnet.blocks.N.conv_net.{0,3}`), so their released weights need a key mapping; with one they give the
original's outputs on an unpadded sequence (in a padded batch the original MRL head's InstanceNorm also sees
the pads, this one does not).

All heads take the language model's padded output `rep [B, L, D]` (CLS at 0, EOS after the last nucleotide,
then pads) and `tokens [B, L]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnalm.tokenizer import CLS_ID, EOS_ID, PAD_ID


@dataclass
class HeadConfig:
    ss_conv_dim: int = 64          # original: 64
    ss_num_blocks: int = 2         # original: 2 ResNet2D bottleneck blocks
    splice_hidden: int = 128       # original: Linear(D, 128) -> GELU -> Linear
    mrl_embed_dim: int = 32        # original: Linear(D, 32), 6 ResNet1D blocks, dropout 0.2
    mrl_num_blocks: int = 6
    mrl_dropout: float = 0.2

    def __post_init__(self) -> None:
        """Checked with the options, before a train run clears OUT (a negative size failed in torch after)."""
        small = [f"{k} must be >= 1, got {v}" for k, v in vars(self).items() if k != "mrl_dropout" and v < 1]
        if not 0 <= self.mrl_dropout < 1:
            small.append(f"mrl_dropout must be in [0, 1), got {self.mrl_dropout}")
        if small:
            raise ValueError("; ".join(small))


# ------------------------------------------------------------------ secondary structure
class ResNet2DBlock(nn.Module):
    """Bottleneck: (1x1 conv, IN, ReLU), (3x3, IN, ReLU), (1x1, IN, ReLU), plus the input. No biases, no affine IN."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_net = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=False), nn.InstanceNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding="same", bias=False), nn.InstanceNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 1, bias=False), nn.InstanceNorm2d(dim), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_net(x)


class ResNet2D(nn.Module):
    def __init__(self, dim: int, num_blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResNet2DBlock(dim) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SecondaryStructureHead(nn.Module):
    """Outer concatenation [x_i; x_j] -> linear_in -> ResNet2D -> conv_out -> symmetric pair logits.

    `linear_in` acts on the 2D-wide concatenation; it is applied as W_i x_i + W_j x_j + b, which is the same
    map without building the [L, L, 2D] tensor. Each sequence goes through the convolutions on its own
    (unpadded) L x L grid, so InstanceNorm statistics never see padding.
    """

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.linear_in = nn.Linear(2 * dim, cfg.ss_conv_dim)
        self.resnet = ResNet2D(cfg.ss_conv_dim, cfg.ss_num_blocks)
        self.conv_out = nn.Conv2d(cfg.ss_conv_dim, 1, 3, padding="same")

    def pair_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [L, D] (nucleotides only) -> symmetric logits [L, L] (diagonal 0)."""
        if x.shape[0] < 2:  # one nucleotide: no pair, and InstanceNorm has no statistics on a 1 x 1 grid
            return x.new_zeros(x.shape[0], x.shape[0])
        d = x.shape[-1]
        w, b = self.linear_in.weight, self.linear_in.bias
        left = x @ w[:, :d].T
        right = x @ w[:, d:].T
        grid = (left[:, None, :] + right[None, :, :] + b).permute(2, 0, 1).unsqueeze(0)  # [1, C, L, L]
        logits = self.conv_out(self.resnet(grid))[0, 0]
        upper = torch.triu(logits, diagonal=1)
        return upper + upper.T

    def forward(self, rep: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """List of [L_b, L_b] logits, one per sequence (CLS/EOS/pads removed)."""
        lengths = nucleotide_lengths(tokens)
        return [self.pair_logits(rep[b, 1:1 + int(n)]) for b, n in enumerate(lengths)]


def nucleotide_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True at the sequence positions of a padded `[<cls>] seq [<eos>] <pad>...` batch."""
    return (tokens != PAD_ID) & (tokens != CLS_ID) & (tokens != EOS_ID)


def nucleotide_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Nucleotides per row of a padded `[<cls>] seq [<eos>] <pad>...` batch."""
    return nucleotide_mask(tokens).sum(dim=1)


def upper_triangle_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over the strict upper triangle (i < j) of one [L, L] matrix."""
    iu = torch.triu_indices(logits.shape[0], logits.shape[1], offset=1, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits[iu[0], iu[1]], target[iu[0], iu[1]])


# ------------------------------------------------------------------ splice sites
class SpliceSiteHead(nn.Module):
    """CLS embedding -> Linear(D, 128) -> GELU -> Linear(128, num_classes)."""

    def __init__(self, dim: int, num_classes: int, cfg: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, cfg.splice_hidden)
        self.linear_out = nn.Linear(cfg.splice_hidden, num_classes)

    def forward(self, rep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_out(F.gelu(self.linear_in(rep[:, 0])))


# ------------------------------------------------------------------ mean ribosome load
def masked_instance_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """InstanceNorm1d (no affine) over the valid positions only; x [B, C, L], mask [B, 1, L] float."""
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1.0)
    mean = (x * mask).sum(dim=-1, keepdim=True) / count
    var = (((x - mean) * mask) ** 2).sum(dim=-1, keepdim=True) / count
    return (x - mean) / torch.sqrt(var + eps) * mask


class ResNet1DBlock(nn.Module):
    """[Conv1d k3 (no bias) -> InstanceNorm1d -> ELU] x 2, plus the input; pads are kept at zero."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(dim, dim, 3, padding="same", bias=False)
        self.conv2 = nn.Conv1d(dim, dim, 3, padding="same", bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.elu(masked_instance_norm(self.conv1(x), mask))   # elu(0) = 0: the pads stay zero
        h = F.elu(masked_instance_norm(self.conv2(h), mask))
        return x + h


class RibosomeLoadHead(nn.Module):
    """Zero pads -> Linear(D, 32) -> 6 ResNet1D blocks -> masked mean over tokens (CLS/EOS included) -> Dropout -> Linear(32, 1)."""

    def __init__(self, dim: int, cfg: HeadConfig = HeadConfig()) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, cfg.mrl_embed_dim)
        self.blocks = nn.ModuleList(ResNet1DBlock(cfg.mrl_embed_dim) for _ in range(cfg.mrl_num_blocks))
        self.dropout = nn.Dropout(cfg.mrl_dropout)
        self.linear_out = nn.Linear(cfg.mrl_embed_dim, 1)

    def forward(self, rep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != PAD_ID).to(rep.dtype)[:, None, :]           # [B, 1, L]
        x = self.linear_in(rep).transpose(1, 2) * mask                # [B, C, L]
        for block in self.blocks:
            x = block(x, mask)
        pooled = x.sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)
        return self.linear_out(self.dropout(pooled)).squeeze(-1)
