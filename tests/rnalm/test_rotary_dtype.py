"""RoPE angles do not depend on the module's dtype: DeepSpeed's bf16 mode casts the whole module with .bfloat16()."""
import numpy as np
import torch

from rnalm.config import ModelConfig
from rnalm.model import RiNALMo


def tiny() -> RiNALMo:
    torch.manual_seed(0)
    return RiNALMo(ModelConfig.preset("nano", dim=64, num_layers=2, num_heads=4)).eval()


def test_rotary_is_computed_in_fp32_after_a_bf16_cast():
    positions = torch.arange(1024)
    cos32, sin32 = tiny().transformer.rotary(positions)
    cos16, sin16 = tiny().bfloat16().transformer.rotary(positions)
    assert cos16.dtype == torch.float32
    torch.testing.assert_close(cos16, cos32, rtol=0, atol=0)
    torch.testing.assert_close(sin16, sin32, rtol=0, atol=0)
    # position 1023 at the slowest frequency (head_dim 16: 10000^(-14/16)), against float64
    angle = 1023 * 10000 ** (-14 / 16)
    assert abs(cos32[1023, 0, 7].item() - np.cos(angle)) < 1e-5
    assert abs(sin32[1023, 0, 7].item() - np.sin(angle)) < 1e-5

