import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from rnalm.attention import BACKENDS, available_backends, varlen_attention
from rnalm.batch import PackedBatch, pad, unpad
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo, SwishGate
from rnalm.tokenizer import MASK_ID, batch_encode, encode

from .reference import reference_forward

TINY = dict(dim=64, num_layers=2, num_heads=4)
SEQS = ["ACGUAGCUAGCUAGGCUA", "GGGAAACCC", "AUGCUNNRY-IAGCUAGCUAGCUAGCAUCGAUCGA", "ACGUA"]


def tiny_model(seed: int = 0, **overrides) -> RiNALMo:
    torch.manual_seed(seed)
    model = RiNALMo(ModelConfig.preset("nano", **{**TINY, **overrides}))
    with torch.no_grad():  # non-trivial LayerNorm/beta values so that a wrong wiring shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("beta"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def masked_batch() -> torch.Tensor:
    ids, _ = batch_encode(SEQS)
    ids = torch.tensor(ids)
    ids[0, 3] = ids[0, 7] = ids[2, 10] = MASK_ID   # different mask ratios per sequence
    return ids


@pytest.mark.parametrize("name,expected", [("nano", 7_508_824), ("micro", 33_491_074),
                                           ("mega", 148_056_972), ("giga", 650_901_793)])
def test_parameter_counts_equal_the_originals(name, expected):
    with torch.device("meta"):
        model = RiNALMo(ModelConfig.preset(name))
    assert model.num_parameters() == expected
    if name == "giga":
        assert model.num_parameters(include_head=False) == 649_231_371
        assert len(model.state_dict()) == 438


def test_padded_forward_matches_float64_reference_of_the_original():
    model = tiny_model()
    tokens = masked_batch()
    with torch.no_grad():
        out = model(tokens)
    ref_logits, ref_rep = reference_forward(model.state_dict(), tokens, num_heads=4)
    real = tokens != 1
    torch.testing.assert_close(out.logits[real].double(), ref_logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.representation[real].double(), ref_rep[real], rtol=1e-4, atol=1e-4)
    assert torch.all(out.logits[~real] == 0)


def test_packed_and_padded_forward_agree_and_sequences_do_not_interact():
    model = tiny_model()
    tokens = masked_batch()
    index, flat, cu, max_len = unpad(tokens)
    batch = PackedBatch.from_sequences([t[t != 1].numpy() for t in tokens])
    assert torch.equal(batch.tokens, flat) and torch.equal(batch.cu_seqlens, cu) and batch.max_seqlen == max_len
    with torch.no_grad():
        packed = model.forward_packed(batch)
        padded = model(tokens)
        alone = model.forward_packed(PackedBatch.from_sequences([tokens[1][tokens[1] != 1].numpy()]))
    torch.testing.assert_close(pad(packed.logits, index, *tokens.shape), padded.logits)
    start, end = int(cu[1]), int(cu[2])
    torch.testing.assert_close(packed.logits[start:end], alone.logits, rtol=1e-5, atol=1e-5)


def test_a_pad_between_real_tokens_is_refused_and_left_padding_gives_right_paddings_outputs():
    """A <pad> inside a row was dropped silently: the tokens after it moved closer, under other rotary positions
    (outputs 0.013 off the reference)."""
    model = tiny_model()
    with torch.no_grad():
        right = model(torch.tensor([[0, 5, 6, 7, 2, 1, 1]])).logits[0, :5]
        left = model(torch.tensor([[1, 1, 0, 5, 6, 7, 2]])).logits[0, 2:]
        torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"row 1 of the padded input has <pad> \(1\) between real tokens"):
            model(torch.tensor([[0, 5, 6, 7, 2, 1, 1], [0, 5, 1, 6, 7, 2, 1]]))


def test_input_with_no_token_or_the_wrong_shape_is_a_clear_error():
    """All-padding or empty batches failed inside attention ('torch.cat(): expected a non-empty list of Tensors'),
    a 1-D input with 'Dimension out of range'."""
    model = tiny_model()
    for tokens, said in ((torch.full((2, 3), 1), r"tokens \(2, 3\): no token that is not <pad>"),
                         (torch.zeros((0, 5), dtype=torch.long), r"tokens \(0, 5\): no token"),
                         (torch.tensor(encode("ACGU")), r"want \[batch, length\] ids, got shape \(6,\)")):
        with pytest.raises(ValueError, match=said):
            model(tokens)


def test_logits_index_runs_the_head_on_those_rows_only():
    model = tiny_model()
    batch = PackedBatch.from_sequences([encode(s) for s in SEQS])
    rows = torch.tensor([1, 5, 17, 30])
    with torch.no_grad():
        full = model.forward_packed(batch).logits
        some = model.forward_packed(batch, logits_index=rows).logits
    assert some.shape == (4, 22)
    torch.testing.assert_close(some, full[rows])


def test_token_dropout_is_active_in_eval_and_rescales_per_sequence():
    model = tiny_model()
    tokens = masked_batch()
    _, flat, cu, _ = unpad(tokens)
    with torch.no_grad():
        emb = model.embed(flat, cu)
        raw = model.embedding(flat)
    lengths = (cu[1:] - cu[:-1]).tolist()
    for i, (start, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        seg = flat[start:start + n]
        ratio = (seg == MASK_ID).float().mean()
        expected = raw[start:start + n] * (1 - 0.12) / (1 - ratio)
        expected[seg == MASK_ID] = 0
        torch.testing.assert_close(emb[start:start + n], expected)
    assert model.training is False  # the 0.88 scale above applied in eval mode (sequence 1 has no mask)


def test_without_token_dropout_the_embedding_is_the_lookup():
    model = tiny_model(token_dropout=False)
    _, flat, cu, _ = unpad(masked_batch())
    with torch.no_grad():
        torch.testing.assert_close(model.embed(flat, cu), model.embedding(flat))


def test_attention_dropout_applies_in_training_only():
    model = tiny_model(attn_dropout=0.1)
    assert model.applies_attention_dropout is False  # (eval mode)
    assert model.train().applies_attention_dropout is True
    assert tiny_model(attn_dropout=0.0).train().applies_attention_dropout is False


def test_attention_backends_agree_with_float64_reference():
    """Outputs and input gradients of every backend this machine has (on a CPU, sdpa alone: the GPU backends are
    compared with an fp32 reference by bench/model_bench.py's `agreement` rows on the device); the lengths put
    unequal sequences into the same padded group of the sdpa backend (6 and 7, 17 and 20), so its key-padding
    mask and the scatter back are exercised."""
    torch.manual_seed(1)
    lengths = [5, 17, 1, 33, 6, 0, 20, 7, 24]   # 0: an empty sequence attends to nothing
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), 4, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = torch.randn(sum(lengths), 4, 16, dtype=torch.float64)

    def reference():
        out = []
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            w = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]).div(4.0).softmax(-1)
            out.append(torch.einsum("hqk,khd->qhd", w, v[s:e]))
        return torch.cat(out)

    def with_grads(fn):
        out = fn()
        grads = torch.autograd.grad((out.double() * weight).sum(), (q, k, v))
        return out.detach().double(), grads

    expected, expected_grads = with_grads(reference)
    backends = available_backends("cpu")
    assert "sdpa" in backends
    for name in backends:
        out, grads = with_grads(lambda: varlen_attention(q.float(), k.float(), v.float(), cu, max(lengths),
                                                         backend=name))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=name)
    assert set(backends) <= set(BACKENDS)


@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_sdpa_sequences_do_not_see_each_others_non_finite_values(tensor):
    """Lengths 6 and 7 share a padded group; a NaN in the 7-long sequence (e.g. a wholly <mask> sequence's token
    dropout, 0/0 as in the original) must stay there, in outputs and gradients, as with the varlen kernels."""
    torch.manual_seed(0)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    qkv = {name: torch.randn(13, 2, 4) for name in "qkv"}
    qkv[tensor][6:] = float("nan")
    leaves = [x.requires_grad_() for x in qkv.values()]
    out = varlen_attention(*leaves, cu, 7, backend="sdpa")
    out[:6].sum().backward()
    clean = [x.detach()[:6].requires_grad_() for x in leaves]
    alone = varlen_attention(*clean, cu[:2], 6, backend="sdpa")
    alone.sum().backward()
    torch.testing.assert_close(out[:6], alone)
    for x, y in zip(leaves, clean):
        torch.testing.assert_close(x.grad[:6], y.grad)


@pytest.mark.parametrize("available, dropout, expected", [
    (("torch_varlen", "flash_attn", "sdpa"), False, "torch_varlen"),
    (("torch_varlen", "flash_attn", "sdpa"), True, "flash_attn"),   # the one of the two that applies dropout
    (("torch_varlen", "sdpa"), True, "torch_varlen"),               # not the slow fallback for the sake of it
    (("torch_varlen", "torch_flash", "sdpa"), True, "torch_flash"),
    (("torch_varlen", "torch_flash", "sdpa"), False, "torch_varlen"),
    (("torch_varlen", "flash_attn", "torch_flash", "sdpa"), True, "flash_attn"),
    (("sdpa",), True, "sdpa"),
    (("sdpa",), False, "sdpa"),
])
def test_auto_backend_prefers_one_that_applies_attention_dropout_when_training_with_it(
        monkeypatch, available, dropout, expected):
    import rnalm.attention as attention

    monkeypatch.setattr(attention, "_available_backends", lambda device_type: available)
    assert attention.resolve_backend("auto", "cuda", dropout=dropout) == expected
    assert attention.resolve_backend("sdpa", "cuda", dropout=dropout) == "sdpa"  # an explicit choice stands
    called = []
    monkeypatch.setattr(attention, "BACKENDS", {name: lambda *a, name=name: called.append(name) for name in available})
    attention.varlen_attention(*[torch.zeros(4, 1, 2, dtype=torch.bfloat16)] * 3, torch.tensor([0, 4], dtype=torch.int32), 4,
                               dropout_p=0.1 if dropout else 0.0)
    assert called == [expected]  # direct callers too


def test_torch_flash_runs_torchs_flash_kernel_with_the_dropout_in_both_passes():
    """The CUDA kernel is the GPU's to run; the call into it, and autograd's backward call with the forward's RNG
    state, are checked here on the meta device (torch's shape functions of the same ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            calls.setdefault(func.__name__.split(".")[0], (args, out))
            return out

    q, k, v = (torch.randn(40, 4, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 10, 40], dtype=torch.int32, device="meta")
    with Record():
        out = BACKENDS["torch_flash"](q, k, v, cu, 30, 0.1)
        out.sum().backward()
    fwd_args, fwd_out = calls["_flash_attention_forward"]
    assert fwd_args[3] is cu and fwd_args[4] is cu and fwd_args[5:9] == (30, 30, 0.1, False)
    bwd_args, _ = calls["_flash_attention_backward"]
    assert bwd_args[8:12] == (30, 30, 0.1, False) and bwd_args[12] is fwd_out[2]  # the forward's RNG state
    assert out.shape == q.shape and all(x.grad.shape == x.shape for x in (q, k, v))


@pytest.mark.parametrize("error", [RuntimeError("no kernel image"), AttributeError("no _flash_attention_forward"),
                                   TypeError("takes 9 arguments")], ids=["gpu-unsupported", "no-op", "other-signature"])
def test_torch_flash_is_offered_only_where_it_runs(monkeypatch, error):
    import rnalm.attention as attention

    assert attention.torch_flash_works("meta")
    with torch.inference_mode():  # the first forward may be an evaluation's
        assert attention.torch_flash_works("meta")
    monkeypatch.setattr(attention, "_torch_flash", lambda *a: (_ for _ in ()).throw(error))
    with pytest.warns(UserWarning, match=rf"torch_flash attention does not run on meta \({type(error).__name__}: {error}"):
        assert not attention.torch_flash_works("meta")


def test_sdpa_applies_attention_dropout_and_warnings_come_once(monkeypatch):
    import warnings

    import rnalm.attention as attention

    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, 2, 4) for _ in range(3))
    plain = varlen_attention(q, k, v, cu, 7, backend="sdpa")
    torch.manual_seed(3)
    dropped = varlen_attention(q, k, v, cu, 7, dropout_p=0.5, backend="sdpa")
    torch.manual_seed(3)
    assert not torch.allclose(plain, dropped) and torch.equal(dropped, varlen_attention(q, k, v, cu, 7, 0.5, "sdpa"))
    monkeypatch.setattr(attention, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attention._warn_once("dropout not applied")
        attention._warn_once("dropout not applied")
    assert [str(w.message) for w in caught] == ["dropout not applied"]


def test_torch_flash_probe_leaves_no_trace_in_random_streams_or_an_enclosing_checkpoint(monkeypatch):
    """The probe's dropout drew from the caller's generator (a resumed run's masks shifted against an uninterrupted
    run's), and inside a checkpointed block (the padded baseline checkpoints every block) its saved tensors went
    through the checkpoint's hooks, which a recomputation, finding the answer cached, did not repeat:
    "A different number of tensors was saved". A CPU stand-in for the CUDA kernel: SDPA with dropout."""
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    import rnalm.attention as attention

    monkeypatch.setattr(attention, "_torch_flash", attention._sdpa)
    state = torch.get_rng_state()
    assert attention.torch_flash_works("cpu")
    assert torch.equal(torch.get_rng_state(), state)

    def block(x, probe):
        if probe:
            attention._torch_flash_runs(torch.device("cpu"))  # cached: the recomputation does not probe again
        return F.dropout(x.sin(), 0.5).cos().sum()

    def grad(probe, checkpointed):
        attention._torch_flash_runs.cache_clear()
        torch.manual_seed(0)
        x = torch.randn(64, requires_grad=True)
        (checkpoint(block, x, probe, use_reentrant=False) if checkpointed else block(x, probe)).backward()
        return x.grad

    try:
        assert torch.equal(grad(True, True), grad(False, False))
    finally:
        attention._torch_flash_runs.cache_clear()


def test_torch_flash_is_probed_on_the_gpu_that_asks(monkeypatch):
    """Probing on the current device (GPU 0 before a rank's set_device, or finetune's --train.device=cuda:1) would
    open a CUDA context there for nothing."""
    import rnalm.attention as attention

    probed = []
    monkeypatch.setattr(attention, "_available_backends", lambda device_type: ("torch_varlen", "sdpa"))
    monkeypatch.setattr(attention, "_torch_flash_runs", lambda device: probed.append(device) or device.index == 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.available_backends("cuda:1") == ["torch_varlen", "torch_flash", "sdpa"]
    assert attention.available_backends("cuda:0") == ["torch_varlen", "sdpa"]  # a GPU where it failed
    assert probed == [torch.device("cuda:1"), torch.device("cuda:0")]


def test_auto_probes_torch_flash_only_where_it_would_be_chosen(monkeypatch):
    """Inference or training without attention dropout on a GPU with torch's varlen kernel never needs torch_flash:
    it was probed anyway (a forward and backward on the GPU), and on a GPU its kernel does not support the probe's
    warning spoke of attention dropout to a user who asked for none."""
    import rnalm.attention as attention

    probed = []
    monkeypatch.setattr(attention, "_available_backends", lambda device_type: ("torch_varlen", "sdpa"))
    monkeypatch.setattr(attention, "_torch_flash_runs", lambda device: probed.append(device) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.resolve_backend("auto", "cuda:0", dropout=False, dtype=torch.bfloat16) == "torch_varlen"
    assert attention.resolve_backend("auto", "cuda:0", dropout=True, dtype=torch.float32) == "sdpa"
    assert probed == []
    assert attention.resolve_backend("auto", "cuda:0", dropout=True, dtype=torch.bfloat16) == "torch_flash"
    assert probed == [torch.device("cuda:0")]
    monkeypatch.setattr(attention, "_available_backends", lambda device_type: ("torch_varlen", "flash_attn", "sdpa"))
    assert attention.resolve_backend("auto", "cuda:0", dropout=True, dtype=torch.bfloat16) == "flash_attn"
    monkeypatch.setattr(attention, "_available_backends", lambda device_type: ("sdpa",))  # torch < 2.10
    assert attention.resolve_backend("auto", "cuda:0", dropout=False, dtype=torch.bfloat16) == "torch_flash"
    assert len(probed) == 2


def test_model_asks_for_a_dropout_backend_only_in_training(monkeypatch):
    import rnalm.attention as attention

    asked = []
    monkeypatch.setattr(attention, "resolve_backend", lambda name, device, dropout=False, dtype=None:
                        asked.append(dropout) or "sdpa")
    tokens = masked_batch()
    tiny_model().train()(tokens)
    tiny_model().eval()(tokens)
    tiny_model(attn_dropout=0.0).train()(tokens)
    assert asked == [True] * 2 + [False] * 4   # once per block


def test_auto_backend_gives_fp32_attention_to_sdpa(monkeypatch):
    """The CUDA varlen kernels take fp16/bf16 only ('FlashAttention only support fp16 and bf16 data type'), so
    neither "auto" nor a kernel named explicitly may hand them fp32 (inference or fine-tuning on a GPU without
    autocast, finetune's validation: a named kernel crashed it after a whole epoch of training)."""
    import rnalm.attention as attention

    used = []

    def half_only_kernel(q, *args):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        used.append(q.dtype)
        return attention._sdpa(q, *args)

    monkeypatch.setattr(attention, "_available_backends", lambda device_type: ("torch_varlen", "sdpa"))
    monkeypatch.setitem(attention.BACKENDS, "torch_varlen", half_only_kernel)
    model, tokens = tiny_model(), masked_batch()
    with torch.no_grad():
        fp32 = model(tokens).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(tokens).logits
    assert used == [torch.bfloat16] * model.config.num_layers
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)
    model.attention_backend = "torch_varlen"       # an explicit choice: the kernel where it runs, sdpa for fp32
    with torch.no_grad():
        with pytest.warns(UserWarning, match="'torch_varlen' takes fp16/bf16 inputs only; torch.float32 ones"):
            torch.testing.assert_close(model(tokens).logits, fp32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(tokens)
    assert used == [torch.bfloat16] * 2 * model.config.num_layers


def test_sdpa_pads_sequences_only_to_the_longest_of_their_length_group(monkeypatch):
    """The CPU path's score matrices stay within 2x of sum(L^2): one 512-long crop among 40 short sequences
    must not pad all 41 to 512 (that padding made an 8k-token nano training step need > 24 GB)."""
    import rnalm.attention as attention

    areas = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        areas.append(q.shape[0] * q.shape[2] ** 2)   # [b, H, L, Dh]: b x L^2 score entries per head
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    lengths = [512] + [20 + i for i in range(40)]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    q = torch.randn(sum(lengths), 2, 8)
    varlen_attention(q, q, q, cu, max(lengths), dropout_p=0.1, backend="sdpa")
    assert areas and sum(areas) <= 2 * sum(n * n for n in lengths)  # areas: SDPA is what ran
    areas.clear()  # groups are sqrt(2) wide: 16 and 23 are padded apart (one group of both: 2 x 23^2)
    two = torch.tensor([0, 16, 39], dtype=torch.int32)
    varlen_attention(q[:39], q[:39], q[:39], two, 23, backend="sdpa")
    assert sorted(areas) == [16 * 16, 23 * 23]


def test_unavailable_or_unknown_backend_is_a_clear_error():
    q = torch.randn(3, 1, 2)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="torch_varlen.*not available on cpu"):
        varlen_attention(q, q, q, cu, 3, backend="torch_varlen")
    with pytest.raises(ValueError, match="unknown attention backend"):
        varlen_attention(q, q, q, cu, 3, backend="xformers")


def test_swish_gate_matches_autograd_of_its_expression():
    g = torch.Generator().manual_seed(0)
    a, gate = (torch.randn(40, 24, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    beta = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwishGate.apply, (a, gate, beta))
    upstream = torch.randn(40, 24, dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(SwishGate.apply(a, gate, beta), (a, gate, beta), upstream)
    plain = torch.autograd.grad(a * torch.sigmoid(beta * a) * gate, (a, gate, beta), upstream)
    for x, y in zip(ours, plain):
        torch.testing.assert_close(x, y)
    # in bf16 (DeepSpeed's mode) the recomputation is as close to float64 as autograd's own bf16 gradients
    def bf16_errors(fn):
        inputs = [x.detach().bfloat16().requires_grad_() for x in (a, gate, beta)]
        got = torch.autograd.grad(fn(*inputs), inputs, upstream.bfloat16())
        return [((x.double() - y).norm() / y.norm()).item() for x, y in zip(got, plain)]
    for ours_err, plain_err in zip(bf16_errors(SwishGate.apply), bf16_errors(lambda x, g, b: x * torch.sigmoid(b * x) * g)):
        assert ours_err <= 1.5 * plain_err + 1e-3
    # bf16 activations with an fp32 beta (autocast over fp32 weights): fp32 out, gradients in each input's dtype
    a16, gate16 = (x.detach().bfloat16().requires_grad_() for x in (a, gate))
    beta32 = beta.detach().float().requires_grad_()
    out = SwishGate.apply(a16, gate16, beta32)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert (a16.grad.dtype, gate16.grad.dtype, beta32.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("ckpt", [True, 1])     # every block; the first of two
def test_activation_checkpointing_gives_the_same_gradients(ckpt, monkeypatch):
    """Same gradients, with exactly the blocks asked for checkpointed (one more would cost its recompute)."""
    import rnalm.model

    calls = []
    real = rnalm.model.checkpoint
    monkeypatch.setattr(rnalm.model, "checkpoint", lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    batch = PackedBatch.from_sequences([encode(s) for s in SEQS])
    grads = []
    for ckpt in (False, ckpt):
        model = tiny_model(seed=3, activation_checkpointing=ckpt, attn_dropout=0.0, residual_dropout=0.0).train()
        model.forward_packed(batch).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    want = list(model.transformer.blocks)[:model.config.checkpointed_blocks]
    assert calls == want and len(want) == (TINY["num_layers"] if ckpt is True else 1)


def test_dropout_only_in_training_and_flops_formula():
    model = tiny_model(residual_dropout=0.5)
    batch = PackedBatch.from_sequences([encode(s) for s in SEQS])
    with torch.no_grad():
        assert torch.equal(model.forward_packed(batch).logits, model.forward_packed(batch).logits)
        model.train()
        assert not torch.equal(model.forward_packed(batch).logits, model.forward_packed(batch).logits)
    cfg = model.config
    encoder = model.num_parameters(include_head=False, include_embedding=False)
    assert model.flops_per_token(100, head_fraction=0.0) == 6 * encoder + 12 * cfg.num_layers * cfg.dim * 100
    lengths = torch.tensor([3, 100])
    assert model.training_flops(lengths) == pytest.approx(3 * model.flops_per_token(3) + 100 * model.flops_per_token(100))


def test_activation_checkpointing_is_all_none_or_a_block_count():
    cfg = ModelConfig.preset("giga")
    assert [replace(cfg, activation_checkpointing=v).checkpointed_blocks for v in (False, True, 0, 12, 99)] == \
        [0, 33, 0, 12, 33]
    with pytest.raises(ValueError, match="activation_checkpointing must be"):
        replace(cfg, activation_checkpointing=-1)


@pytest.mark.parametrize("ckpt", [False, True])
def test_ffn_align_widens_the_matmuls_and_changes_nothing_else(ckpt):
    """ffn_align (default 64): the FFN's matmuls run at a 16-byte-aligned width (giga 3413 -> 3456); parameters,
    outputs and gradients stay those of the original width (ffn_align 1), so AdamW steps keep the two identical."""
    assert ModelConfig.preset("giga").ffn_width == 3456 and ModelConfig.preset("giga", ffn_align=1).ffn_width == 3413
    plain = tiny_model(seed=4, ffn_align=1, activation_checkpointing=ckpt).double().train()   # ffn_dim 170
    aligned = tiny_model(seed=5, ffn_align=64, activation_checkpointing=ckpt).double().train()
    assert {k: v.shape for k, v in aligned.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    aligned.load_state_dict(plain.state_dict())
    widths = []
    aligned.transformer.blocks[0].transition[2].register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[-1]))
    batch = PackedBatch.from_sequences([encode(s) for s in SEQS])
    optims = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (plain, aligned)]
    for step in range(3):
        logits = []
        for model, opt in zip((plain, aligned), optims):
            torch.manual_seed(step)                       # the same dropout masks
            out = model.forward_packed(batch).logits
            out.square().mean().backward()
            logits.append(out.detach())
            opt.step()
            opt.zero_grad()
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-12, atol=1e-12)
    assert widths[0] == 192
    for (name, p), q in zip(plain.named_parameters(), aligned.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="ffn_align"):
        ModelConfig.preset("nano", ffn_align=0)


def _rehome_at_odd_offsets(model: RiNALMo) -> None:
    """Every parameter becomes a view into one flat buffer, back to back from one element in (what DeepSpeed's
    ZeRO does with its flat buffers): most start off a 16-byte boundary."""
    params = list(model.parameters())
    flat = torch.empty(1 + sum(p.numel() for p in params), dtype=params[0].dtype)
    offset = 1
    for p in params:
        flat[offset:offset + p.numel()].copy_(p.detach().flatten())
        p.data = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()


def test_matmuls_get_16_byte_aligned_operands_from_parameters_at_any_offset():
    """ZeRO's parameters sit at any offset of a flat buffer; cuBLAS runs unaligned operands on slow kernels or
    fails ('misaligned address' behind inductor's addmm on an H200). Every matmul operand is aligned, and the
    logits and every gradient equal those of the same model with parameters of their own."""
    from bench.gemm_alignment import GemmOperands

    own = tiny_model(seed=6).train()
    viewed = tiny_model(seed=6).train()
    _rehome_at_odd_offsets(viewed)
    assert sum(p.data_ptr() % 16 != 0 for p in viewed.parameters()) > len(list(viewed.parameters())) // 2
    batch = PackedBatch.from_sequences([encode(s) for s in SEQS])
    results = []
    for model in (own, viewed):
        torch.manual_seed(0)                               # the same dropout masks
        record = GemmOperands()
        with record:
            logits = model.forward_packed(batch).logits
            logits.square().mean().backward()
        assert record.calls > 20 and record.misaligned_operands == 0, record.misaligned
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for g_viewed, g_own in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_viewed, g_own, rtol=0, atol=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")
def test_compiled_blocks_never_hand_a_parameter_straight_to_a_matmul():
    """Under torch.compile every matmul operand must be a fresh tensor, never a parameter (which ZeRO may place at
    an odd offset): inductor removes a plain clone (and a zero pad) as a no-op, which left a ZeRO-2 bias misaligned
    in the H200 run's addmm. Checked on the graphs inductor actually runs (after its own passes)."""
    views = {torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.view.default,
             torch.ops.aten.transpose.int, torch.ops.aten.expand.default, torch.ops.aten.reshape.default}
    gemms = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    straight = []

    def base(node):
        while isinstance(node, torch.fx.Node) and node.target in views:
            node = node.args[0]
        return node

    def is_parameter(node) -> bool:  # a forward graph's input that is not a [tokens, ...] activation
        return (isinstance(node, torch.fx.Node) and node.op == "placeholder" and node.name.startswith("primals")
                and node.meta["val"].shape[0] != tokens)

    def check(graph: torch.fx.Graph) -> None:
        for node in graph.nodes:
            if node.target in gemms:
                straight.extend(b.name for b in map(base, node.args) if is_parameter(b))

    torch._dynamo.reset()
    model = tiny_model(seed=7, ffn_align=64).train().compile_blocks(dynamic=False)
    _rehome_at_odd_offsets(model)
    batch = PackedBatch.from_sequences([encode(s) for s in SEQS])
    tokens = batch.tokens.numel()
    assert tokens not in {64, 192, 170, 22, 1}        # no parameter dimension of the tiny model
    with torch._inductor.config.patch(post_grad_custom_post_pass=check, fx_graph_cache=False):
        model.forward_packed(batch).logits.square().mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert not straight, f"parameters handed straight to a matmul: {straight}"


def test_a_linear_layer_refuses_an_input_of_another_width():
    """F.pad cropped the weight for a narrower input and ignored the extra columns of a wider one (nn.Linear
    raises); only the FFN's output layer takes its zero columns."""
    from rnalm.model import AlignedLinear

    layer = AlignedLinear(8, 4)
    for width in (6, 10):
        with pytest.raises(ValueError, match=f"input of width {width} into a linear layer of 8 inputs"):
            layer(torch.randn(2, width))
    assert AlignedLinear(8, 4, in_pad=2)(torch.randn(2, 10)).shape == (2, 4)
