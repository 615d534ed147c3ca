"""Training FLOPs of a packed step and model FLOPs utilisation (MFU), as the trainer's metrics and the bench use them.

The formula lives in rnalm.model (`RiNALMo.training_flops` / `flops_per_token`); here it is applied to a step:
    6 * N_encoder * T  +  6 * N_head * M  +  12 * layers * dim * sum_i L_i^2
with T the real (non-pad) tokens, M the masked tokens (the MLM head runs only there), N_encoder the
parameters without the embedding lookup and the MLM head, N_head the MLM head's parameters; the last
term is attention scores and values (forward + backward) at the actual sequence lengths.
MFU = FLOPs / (seconds * peak FLOP/s of one device * devices). The peak is the device's dense bf16 datasheet figure
(`peak_flops_of`, by the CUDA device name), H100 SXM's 989e12 for a device not in the table.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from rnalm.config import ModelConfig
from rnalm.model import RiNALMo

H100_BF16_DENSE_FLOPS = 989e12
# Dense (no sparsity) bf16 peaks from NVIDIA's datasheets; the first key found in the device name wins, so the
# NVL / PCIe variants come before their SXM names.
PEAK_BF16_DENSE_FLOPS = (("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
                         ("H200", 989e12), ("B200", 2250e12), ("A100", 312e12))


def peak_flops_of(device_name: str) -> float:
    """Dense bf16 peak FLOP/s of a device ("NVIDIA H200 NVL", ...); H100 SXM's for one not in the table."""
    return next((peak for key, peak in PEAK_BF16_DENSE_FLOPS if key.lower() in device_name.lower()),
                H100_BF16_DENSE_FLOPS)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class FlopCounter:
    def __init__(self, cfg: ModelConfig) -> None:
        with torch.device("meta"):  # counts only; no memory, works before ZeRO-3 partitions the real model
            self._model = RiNALMo(cfg)

    def step_flops(self, lengths: Sequence[int] | torch.Tensor, masked_tokens: int) -> float:
        """FLOPs of forward + backward over sequences of these real lengths, MLM head on `masked_tokens` rows."""
        lengths = torch.as_tensor(lengths, dtype=torch.float64)
        tokens = float(lengths.sum())
        if tokens == 0:
            return 0.0
        return self._model.training_flops(lengths, head_fraction=masked_tokens / tokens)


def mfu(flops: float, seconds: float, devices: int = 1, peak_flops: float = H100_BF16_DENSE_FLOPS) -> float:
    return flops / (seconds * peak_flops * devices) if seconds > 0 else 0.0
