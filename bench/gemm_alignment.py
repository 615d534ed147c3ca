"""Are the matmul operands of a training step 16-byte aligned under DeepSpeed? Counts those that are not.

    python bench/gemm_alignment.py --config pretrain/configs/giga.yaml [--set train.ds_config=ds_configs/zero2.json]

Builds the model, the optimizer and the DeepSpeed engine as the trainer does (one rank, its config and parameter
groups), runs one forward and backward of the MLM logits on random packed sequences under a dispatch mode that
records the address of every tensor operand of every matmul (aten mm/addmm/bmm/baddbmm), and prints JSON: the
calls, the operands and the misaligned ones (address not a multiple of 16 bytes) with their shapes. Why it
matters: ZeRO keeps parameters as views at any element offset of flat buffers, and cuBLAS runs unaligned
operands on slow kernels, or fails (rnalm.model.gemm_operand; BENCHMARKS.md, "GEMM operand alignment").
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_bench import write_result  # noqa: E402
from pretrain.config import PretrainConfig, deepspeed_config  # noqa: E402
from pretrain.train import _adamw, _default_distributed_env, _device, _exit, _new_model, _use_bf16  # noqa: E402
from rnalm.configfile import load  # noqa: E402
from rnalm.model import GEMM_ALIGNMENT  # noqa: E402

aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class GemmOperands(TorchDispatchMode):
    """Records (op, shape, address % GEMM_ALIGNMENT) of every tensor operand of every matmul run inside."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = self.operands = 0
        self.misaligned: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            self.calls += 1
            for a in (*args, *(kwargs or {}).values()):
                if isinstance(a, torch.Tensor):
                    self.operands += 1
                    if a.data_ptr() % GEMM_ALIGNMENT:
                        self.misaligned[f"{func.__name__} {tuple(a.shape)} +{a.data_ptr() % GEMM_ALIGNMENT}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def misaligned_operands(self) -> int:
        return sum(self.misaligned.values())


def random_batch(cfg: PretrainConfig, tokens: int, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(torch.randint(16, cfg.data.max_len + 1, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - tokens
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])
    ids = torch.randint(4, cfg.model.build().vocab_size, (tokens,), generator=g)
    return (ids.to(device), cu.to(device), positions.to(device), max(lengths))


def measure(cfg: PretrainConfig, tokens: int, seed: int = 0) -> dict:
    import deepspeed

    _default_distributed_env()
    deepspeed.init_distributed(auto_mpi_discovery=False)
    device = _device(int(os.environ.get("LOCAL_RANK", 0)))
    bf16 = _use_bf16(cfg, device)
    ds_cfg = deepspeed_config(cfg, bf16)
    model = _new_model(cfg, ds_cfg, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=_adamw(model, cfg.optim, device), config=ds_cfg)
    tokens_, cu, positions, max_seqlen = random_batch(cfg, tokens, seed, device)
    record = GemmOperands()
    with record:
        logits = engine(tokens_, cu, positions, max_seqlen, None)
        engine.backward(logits.float().square().mean())
    return {"zero_stage": ds_cfg["zero_optimization"]["stage"], "dtype": "bf16" if bf16 else "fp32",
            "device": device.type, "tokens": tokens, "gemm_calls": record.calls, "operands": record.operands,
            "misaligned_operands": record.misaligned_operands, "misaligned": dict(record.misaligned)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="pretrain config YAML (pretrain/configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens in the packed batch")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    result = measure(load(PretrainConfig, args.config, args.set), args.tokens)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
    _exit(0, clean=True)  # as the trainer leaves: gloo aborts now and then at interpreter shutdown
