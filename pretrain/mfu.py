"""Training FLOPs of a packed step and model FLOPs utilisation (MFU); the one formula metrics and bench use.

FLOPs(step) = sum over sequences i of L_i * model.flops_per_token(L_i, head_fraction), i.e.
    6 * N_encoder * T  +  6 * N_head * M  +  12 * layers * dim * sum_i L_i^2
with T the real (non-pad) tokens, M the masked tokens (the MLM head runs only there), N_encoder the
parameters without the embedding lookup and the MLM head, N_head the MLM head's parameters; the last
term is attention scores and values (forward + backward) at the actual sequence lengths.
MFU = FLOPs / (seconds * peak FLOP/s of one device * devices). Default peak: 989e12 (H100 SXM, dense bf16).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from rnalm.config import ModelConfig
from rnalm.model import RiNALMo

H100_BF16_DENSE_FLOPS = 989e12


class FlopCounter:
    def __init__(self, cfg: ModelConfig) -> None:
        with torch.device("meta"):  # counts only; no memory, works before ZeRO-3 partitions the real model
            self._model = RiNALMo(cfg)

    def step_flops(self, lengths: Sequence[int] | torch.Tensor, masked_tokens: int) -> float:
        lengths = torch.as_tensor(lengths, dtype=torch.float64)
        tokens = float(lengths.sum())
        if tokens == 0:
            return 0.0
        mean_attended = float((lengths * lengths).sum()) / tokens  # so that T * 12*l*d*this = 12*l*d*sum L^2
        return tokens * self._model.flops_per_token(mean_attended, head_fraction=masked_tokens / tokens)


def mfu(flops: float, seconds: float, devices: int = 1, peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    return flops / (seconds * peak_flops * devices) if seconds > 0 else 0.0
