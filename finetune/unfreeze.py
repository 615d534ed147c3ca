"""Gradual unfreezing, as the original's fine-tuning callback.

Epoch 0: only the head (and whatever `head_only_epochs == 0` makes trainable) learns. From epoch
`head_only_epochs` on, every `every` epochs the next `blocks_per_step` transformer blocks from the top are
unfrozen (the final LayerNorm with the first step), down to `max_blocks` blocks (0: the LM stays frozen); each step's parameters
join the optimizer as a new group with lr / `lr_divisor`. The embedding is never unfrozen unless
`train_embedding`. The original SS schedule for giga (33 blocks) is head_only_epochs=3, every=3,
blocks_per_step=3, max_blocks=24; MRL is head_only_epochs=3, blocks_per_step=27 (blocks 6-32 at once).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class UnfreezeConfig:
    head_only_epochs: int = 3       # 0: the LM (blocks + final LN) trains from the first epoch, at full lr
    every: int = 3
    blocks_per_step: int = 3
    max_blocks: int | None = None   # None: all blocks eventually
    train_embedding: bool = False
    lr_divisor: float = 10.0

    def __post_init__(self) -> None:
        """Refuses settings that make no schedule (every=0 put all steps on one epoch, blocks_per_step=0 never
        ended)."""
        least = {"head_only_epochs": 0, "every": 1, "blocks_per_step": 1, "max_blocks": 0}
        low = [f"{k} must be >= {n}, got {getattr(self, k)}" for k, n in least.items()
               if getattr(self, k) is not None and getattr(self, k) < n]
        if not self.lr_divisor > 0:
            low.append(f"lr_divisor must be > 0, got {self.lr_divisor}")
        if low:
            raise ValueError("; ".join(low))


def schedule(cfg: UnfreezeConfig, num_layers: int) -> dict[int, list[str]]:
    """epoch -> parameter-name prefixes (of the LM) unfrozen at the start of that epoch. The final LayerNorm goes
    with the first blocks: max_blocks=0 keeps the whole LM frozen (the embedding too, unless train_embedding)."""
    total = num_layers if cfg.max_blocks is None else min(cfg.max_blocks, num_layers)
    out: dict[int, list[str]] = {}
    done, step = 0, 0
    while done < total:
        n = total if cfg.head_only_epochs <= 0 else min(cfg.blocks_per_step, total - done)  # 0: all at once
        top = num_layers - done
        names = [f"transformer.blocks.{i}." for i in range(top - n, top)]
        if step == 0:
            names.insert(0, "transformer.final_layer_norm.")
        out[cfg.head_only_epochs + step * cfg.every] = names
        done, step = done + n, step + 1
    if cfg.train_embedding:
        out.setdefault(max(out, default=cfg.head_only_epochs), []).append("embedding.")
    return out


class Unfreezer:
    """Freezes the LM at construction; `step(epoch)` unfreezes that epoch's parameters and returns them."""

    def __init__(self, lm: nn.Module, cfg: UnfreezeConfig, num_layers: int) -> None:
        self.lm, self.cfg = lm, cfg
        self.plan = schedule(cfg, num_layers)
        for p in lm.parameters():
            p.requires_grad_(False)

    def step(self, epoch: int) -> list[nn.Parameter]:
        prefixes = self.plan.get(epoch, [])
        params = [p for name, p in self.lm.named_parameters()
                  if any(name.startswith(pre) for pre in prefixes) and not p.requires_grad]
        for p in params:
            p.requires_grad_(True)
        return params

    def lr_scale(self, epoch: int) -> float:
        """Scale of the lr for groups added at `epoch`: full at epoch 0, lr / divisor afterwards."""
        return 1.0 if epoch == 0 else 1.0 / self.cfg.lr_divisor
