"""Task definitions: secondary structure (ss), splice sites (splice), mean ribosome load (mrl), and the user's own
labelled sequences (classify, regress)."""
from __future__ import annotations

from typing import Any

from torch import nn

from finetune.heads import HeadConfig, RibosomeLoadHead, SecondaryStructureHead, SpliceSiteHead

TASKS = ("ss", "splice", "mrl", "classify", "regress")


def build_head(task: str, dim: int, cfg: HeadConfig, meta: dict[str, Any]) -> nn.Module:
    """The head of a saved fine-tuned model (`meta`: its finetune.json; classes for splice and classify)."""
    if task == "ss":
        return SecondaryStructureHead(dim, cfg)
    if task in ("splice", "classify"):
        return SpliceSiteHead(dim, len(meta["classes"]), cfg)
    if task in ("mrl", "regress"):
        return RibosomeLoadHead(dim, cfg)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
