"""RoPE angles do not depend on the module's dtype: DeepSpeed's bf16 mode casts the whole module with .bfloat16()."""
import numpy as np
import torch

from rnalm.config import ModelConfig
from rnalm.model import RiNALMo, Rotary, apply_rotary


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



def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The original's form: x cos + rotate_half(x) sin over the full head dim, in float64."""
    x, cos, sin = x.double(), torch.cat((cos, cos), -1).double(), torch.cat((sin, sin), -1).double()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rotary_is_the_rotate_half_rotation_and_its_backward_is_exact():
    torch.manual_seed(0)
    cos, sin = (t.double() for t in Rotary(16, 10000.0)(torch.arange(37) % 11))
    x = torch.randn(37, 3, 16, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(apply_rotary(x, cos, sin), rotate_half_reference(x, cos, sin), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))


def test_rotary_rounds_once_to_the_input_dtype_eager_and_compiled():
    """bf16 in, bf16 out, computed in fp32: within one bf16 rounding of the float64 rotation, in eager mode (two
    passes per half written into the output) and in the form torch.compile fuses; their gradients agree too."""
    torch.manual_seed(1)
    cos, sin = Rotary(64, 10000.0)(torch.arange(300) % 120)
    x = torch.randn(300, 4, 64).bfloat16().requires_grad_()
    exact = rotate_half_reference(x.detach(), cos, sin)
    eager = apply_rotary(x, cos, sin)
    compiled = torch.compile(apply_rotary, dynamic=False)(x, cos, sin)
    for out in (eager, compiled):
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), exact, rtol=2 ** -8, atol=1e-6)
    grad = torch.randn_like(eager)
    g_eager, = torch.autograd.grad(eager, x, grad)
    g_compiled, = torch.autograd.grad(compiled, x, grad)
    torch.testing.assert_close(g_eager, g_compiled, rtol=2 ** -7, atol=1e-2)
