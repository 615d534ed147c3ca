"""DataConfig: the `data:` section of a pretraining config (the shard contract: ../shared/DESIGN.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    shards: str                                     # OUT dir of dataprep (manifest.json inside)
    split: str = "train"
    sampling: Literal["cluster", "uniform"] = "cluster"  # cluster: one record per cluster per epoch
    seed: int = 0
    token_budget: int = 8192                        # tokens per packed micro-batch (incl. <cls>/<eos>), per rank
    max_len: int = 1024                             # records over max_len-2 nt: cropped to that, no <cls>/<eos>
    mask_prob: float = 0.15                         # 80% <mask>, 10% random nucleotide, 10% unchanged
    shuffle_buffer: int = 10000                     # records per shuffle window
    num_workers: int = 2                            # DataLoader worker processes (0: read in the calling process)
    on_corrupt: Literal["skip", "fail"] = "skip"
    infinite: bool = True                           # False (validation): one deterministic pass, epoch 0 only
    max_records: int = 0                            # one pass only: its first N records in the split's seeded
                                                    # order, shared by all ranks (0: every record)
    prefetch_factor: int = 4                        # batches each worker prepares ahead
    pin_memory: bool = False                        # pin batches (fast host-to-GPU copies); ignored without a GPU

    def __post_init__(self) -> None:
        if self.sampling not in ("cluster", "uniform"):
            raise ValueError(f"sampling must be 'cluster' or 'uniform', not {self.sampling!r}")
        if self.on_corrupt not in ("skip", "fail"):
            raise ValueError(f"on_corrupt must be 'skip' or 'fail', not {self.on_corrupt!r}")
        if self.max_len < 3:
            raise ValueError(f"max_len must be >= 3 (room for <cls> x <eos>), got {self.max_len}")
        if self.token_budget < self.max_len:
            raise ValueError(f"token_budget ({self.token_budget}) must hold one sequence of max_len "
                             f"({self.max_len}) tokens")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {self.mask_prob}")
        if not 0 <= self.seed < 2**63:  # numpy's seed sequences take no negative numbers
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_records < 0 or (self.max_records and self.infinite):
            raise ValueError(f"max_records ({self.max_records}) caps a one-pass loader (infinite=False) and must "
                             "be >= 0")
        if self.shuffle_buffer < 1 or self.num_workers < 0 or self.prefetch_factor < 1:
            raise ValueError("shuffle_buffer and prefetch_factor must be >= 1 and num_workers >= 0")
