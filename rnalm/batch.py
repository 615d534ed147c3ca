"""Packed variable-length batches: flat tokens + int32 cu_seqlens, as varlen attention wants them."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from rnalm.tokenizer import PAD_ID

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """`tokens[cu_seqlens[i]:cu_seqlens[i+1]]` is sequence i; positions restart at 0 for each one."""

    tokens: torch.Tensor                 # [T] int64
    cu_seqlens: torch.Tensor             # [B+1] int32, cu_seqlens[0] == 0, cu_seqlens[-1] == T
    max_seqlen: int
    positions: torch.Tensor              # [T] int64
    targets: torch.Tensor | None = None  # [T] int64, IGNORE_INDEX where no loss
    ids: tuple[str, ...] | None = None   # record ids, one per sequence (for logging and resume checks)

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackedBatch":
        return self._map_tensors(torch.Tensor.pin_memory)

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PackedBatch":
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: fn(v) for k, v in tensors.items() if isinstance(v, torch.Tensor)})

    @classmethod
    def from_sequences(cls, seqs: Sequence[np.ndarray | torch.Tensor],
                       targets: Sequence[np.ndarray | torch.Tensor] | None = None,
                       ids: Sequence[str] | None = None) -> "PackedBatch":
        """Pack already-tokenised sequences (and optional per-token targets) back to back."""
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        cu = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        tokens = torch.as_tensor(np.concatenate([np.asarray(s) for s in seqs])).long()
        packed_targets = None
        if targets is not None:
            packed_targets = torch.as_tensor(np.concatenate([np.asarray(t) for t in targets])).long()
        return cls(tokens=tokens, cu_seqlens=torch.from_numpy(cu),
                   max_seqlen=int(lengths.max(initial=0)),
                   positions=torch.from_numpy(ragged_arange(lengths)),
                   targets=packed_targets, ids=tuple(ids) if ids is not None else None)


def ragged_arange(counts: np.ndarray) -> np.ndarray:
    """[0..counts[0]-1, 0..counts[1]-1, ...] without a Python loop: per-token positions of host-side batches
    (far cheaper on CPU than positions_from_cu_seqlens's repeat_interleave)."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-token position within its own sequence, e.g. cu=[0,3,5] -> [0,1,2,0,1] (on the tensors' device)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    total = int(cu[-1])
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def unpad(tokens: torch.Tensor, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Padded [B, L] ids -> (flat indices of real tokens, flat tokens, cu_seqlens int32, max_seqlen).

    The real tokens of a row must be one run (right padding, as the tokenizer produces; left padding too): a
    <pad> between them would be dropped and move the tokens after it closer, under other rotary positions.
    """
    keep = tokens != pad_id
    lengths = keep.sum(dim=1)
    pad_to_real = (~keep[:, :-1] & keep[:, 1:]).sum(dim=1)  # left padding: one such step, at its end
    gapped = (pad_to_real > (~keep[:, :1]).sum(dim=1)).nonzero()
    if gapped.numel():
        raise ValueError(f"row {int(gapped[0])} of the padded input has <pad> ({pad_id}) between real tokens: "
                         "padding goes after them")
    cu = torch.zeros(tokens.shape[0] + 1, dtype=torch.int32, device=tokens.device)
    cu[1:] = torch.cumsum(lengths, 0)
    index = keep.flatten().nonzero().squeeze(1)
    return index, tokens.flatten()[index], cu, int(lengths.max()) if lengths.numel() else 0


def pad(flat: torch.Tensor, index: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter per-token rows [T, ...] back into [B, L, ...], zeros at padding."""
    out = flat.new_zeros((batch * seqlen, *flat.shape[1:]))
    out[index] = flat
    return out.view(batch, seqlen, *flat.shape[1:])
