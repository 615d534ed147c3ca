"""Pretraining throughput: the real trainer (DeepSpeed ZeRO-3, packed token budget, streaming loader) against a
padded baseline trained the original way, in one run, on sequence lengths of the real ncRNA corpus.

    python bench/pretrain_bench.py --preset giga --out bench_pretrain_giga.json  # H100: ZeRO-3, bf16
    python bench/pretrain_bench.py --tiny --steps 4 --warmup 2  # CPU: logic check

packed: `python -m pretrain.train` (torchrun, --nproc ranks) on shards built from the ncRNA corpus with
  dataprep's CLI; steady-state numbers from its log.jsonl after --warmup steps: real (non-pad) tokens/s,
  MFU, loader wait share, peak device memory.
padded: the original recipe's shape: batches of --padded-batch (192) sequences drawn from the corpus
  lengths, padded to the batch's longest, every position computed including the MLM head, but attention over
  the real tokens only (the original's flash path unpads around it), every block activation-checkpointed, bf16
  autocast over fp32 weights, torch AdamW + clipping; one process, no ZeRO.
MFU (both): pretrain.mfu / RiNALMo.training_flops over real tokens only:
  6 x N_encoder x T + 6 x N_head x M + 12 x layers x dim x sum(L_i^2), against --peak-tflops per device (default:
  the GPU's dense bf16 peak, e.g. 989 for H100/H200 SXM, 835 for H200 NVL; recorded in the result as peak_tflops);
  M = masked tokens for the packed run (head on masked rows), = T for the padded run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.model_bench import CORPUS, corpus_lengths, padded_batches, write_result  # noqa: E402
from pretrain.mfu import FlopCounter, device_name, peak_flops_of  # noqa: E402
from pretrain.profiling import PROFILE_STEPS  # noqa: E402
from rnalm.batch import IGNORE_INDEX  # noqa: E402
from rnalm.config import ModelConfig  # noqa: E402
from rnalm.model import RiNALMo  # noqa: E402
from rnalm.tokenizer import PAD_ID  # noqa: E402

TINY = {"model": ["model.preset=nano", "model.dim=64", "model.num_layers=2", "model.num_heads=4"],
        "trainer": ["train.precision=fp32", "data.token_budget=2048", "data.max_len=256", "data.num_workers=0",
                    "train.ds_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]}


def build_shards(corpus: Path, out: Path) -> Path:
    cmd = [sys.executable, str(REPO / "dataprep" / "build_shards.py"), "--input", str(corpus), "--out", str(out),
           "--no-cluster", "--valid-fraction", "0.01", "--no-report", "--quiet"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def packed_run(args, shards: Path, out_dir: Path) -> dict:
    """The real trainer; numbers from its per-step log lines after the warm-up steps. With --profile, PROFILE_STEPS
    more steps run under torch.profiler after the timed ones (its overhead kept out of the numbers)."""
    timed = args.warmup + args.steps
    total = timed + (PROFILE_STEPS if args.profile else 0)
    overrides = [f"--data.shards={shards}", f"--train.out_dir={out_dir}", f"--train.max_steps={total}",
                 f"--optim.warmup_steps={min(2000, total - 1)}", "--train.valid_every=0", "--checkpoint.every=0",
                 "--checkpoint.save_at_end=false", "--checkpoint.resume=false", "--metrics.port_base=0",
                 f"--metrics.peak_flops={args.peak_tflops * 1e12}", f"--train.log_every={max(1, total // 5)}"]
    config = REPO / "pretrain" / "configs" / ("tiny_cpu.yaml" if args.tiny else f"{args.preset}.yaml")
    sets = (TINY["model"] + TINY["trainer"] if args.tiny else []) + args.set
    sets += [f"train.profile_at={timed + 1}"] if args.profile else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "pretrain.train", "--config", str(config), *overrides, *[f"--{s}" for s in sets]]
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    steps = [r for r in records if "event" not in r][args.warmup:timed]
    seconds = sum(r["step_seconds"] for r in steps)
    tokens_per_s = sum(r["step_tokens"] for r in steps) / seconds  # all ranks
    result = {"world_size": start["world_size"], "precision": start["precision"], "steps": len(steps),
              "real_tokens_per_s": tokens_per_s, "real_tokens_per_s_per_gpu": tokens_per_s / start["world_size"],
              "mfu": sum(r["step_flops"] for r in steps) / (seconds * args.peak_tflops * 1e12 * start["world_size"]),
              "loader_wait_fraction": sum(r["loader_wait_s"] for r in steps) / seconds,
              "peak_memory_gib": max(r["memory_peak_bytes"] for r in steps) / 2**30,
              "mean_step_seconds": seconds / len(steps), "last_loss": steps[-1]["loss"],
              # as the device ran them (pretrain.profiling.PhaseClock); the rest of a step is host-only time
              "phase_seconds_per_step": {phase: sum(r[f"{phase}_s"] for r in steps) / len(steps)
                                         for phase in ("forward", "backward", "optimizer", "forward_host",
                                                       "backward_host", "optimizer_host")}}
    profile = next((r for r in records if r.get("event") == "profile"), None)
    if profile:  # where the time of the profiled steps went (pretrain.profiling)
        ops = (out_dir / "profile" / "ops.txt").read_text().splitlines()
        result["profile"] = {**{k: v for k, v in profile.items() if k not in ("event", "folder")},
                             "ops_table": ops[:45]}
    failed = next((r for r in records if r.get("event") == "profile_failed"), None)
    if failed:
        result["profile_error"] = failed["error"]
    return result


class UnpaddedAttention:
    """The original's attention on padded batches (FlashMultiHeadSelfAttention: unpad_input, varlen flash
    attention, pad_input): every other layer runs on all B x Lmax positions, attention on the real tokens only.
    Attention over the pads too would cost B x Lmax^2 instead of sum L_i^2 (~16x at B = 192 on the corpus
    lengths, ~7% more FLOPs in all), a slower baseline than the original."""

    def __init__(self, model: RiNALMo) -> None:
        self.real = self.cu_seqlens = None
        self.max_seqlen = 0
        for block in model.transformer.blocks:
            block.mh_attn.attend = functools.partial(self._attend, block.mh_attn.attend)

    def set_batch(self, tokens: torch.Tensor, real_lengths: torch.Tensor) -> None:
        self.real = (tokens != PAD_ID).nonzero().squeeze(1)
        self.cu_seqlens = F.pad(real_lengths.to(tokens.device).cumsum(0), (1, 0)).int()
        self.max_seqlen = int(real_lengths.max())

    def _attend(self, attend, q, k, v, cu_seqlens, max_seqlen, backend):
        out = attend(q[self.real], k[self.real], v[self.real], self.cu_seqlens, self.max_seqlen, backend)
        return out.new_zeros(q.shape[0], out.shape[1]).index_copy(0, self.real, out)


def original_model(cfg: ModelConfig, device: torch.device) -> tuple[RiNALMo, UnpaddedAttention]:
    """The model as the original trained it: every block activation-checkpointed, attention unpadded, the FFN
    matmuls at their own width (ffn_align 1: the 64-aligned default is one of our levers, not the original's)."""
    with device:
        model = RiNALMo(ModelConfig.from_dict({**cfg.to_dict(), "activation_checkpointing": True,
                                               "ffn_align": 1})).train()
    return model, UnpaddedAttention(model)


def padded_run(args, cfg: ModelConfig, lengths: np.ndarray, device: torch.device) -> dict:
    """Original-style training steps: B sequences padded to the longest, all positions computed but attention."""
    torch.manual_seed(0)
    model, attention = original_model(cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=device.type == "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    flops = FlopCounter(cfg)
    rng = np.random.default_rng(0)
    batches = padded_batches(lengths, args.padded_batch, rng, args.warmup + args.padded_steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = total_flops = 0.0
    for i, (batch, real_lengths) in enumerate(batches):
        if i == args.warmup:
            sync()
            t0 = time.perf_counter()
        batch = batch.to(device)
        attention.set_batch(batch.tokens, real_lengths)
        targets = torch.where((torch.rand(batch.tokens.shape, device=device) < 0.15) & (batch.tokens != PAD_ID),
                              batch.tokens, torch.full_like(batch.tokens, IGNORE_INDEX))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model.forward_packed(batch).logits
        loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            real += float(real_lengths.sum())
            n = int(real_lengths.sum())
            total_flops += flops.step_flops(real_lengths, n)
    sync()
    seconds = time.perf_counter() - t0
    out = {"batch": args.padded_batch, "steps": args.padded_steps, "precision": str(dtype).removeprefix("torch."),
           "ffn_width": model.config.ffn_width,
           "real_tokens_per_s": real / seconds, "mfu": total_flops / (seconds * args.peak_tflops * 1e12),
           "mean_step_seconds": seconds / args.padded_steps}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _num_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return RiNALMo(cfg).num_parameters()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="giga", choices=["nano", "micro", "mega", "giga"])
    ap.add_argument("--tiny", action="store_true", help="2-layer dim-64 model, fp32 on CPU (tests the logic)")
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps of the packed run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--padded-batch", type=int, default=192)
    ap.add_argument("--padded-steps", type=int, default=10)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, help="per device, for MFU (default: the GPU's dense bf16 peak, "
                    "pretrain.mfu.PEAK_BF16_DENSE_FLOPS; H100 SXM's 989 when unknown)")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--shards", type=Path, help="an existing shard set (default: built from --corpus)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="trainer config override for the packed run (repeatable)")
    ap.add_argument("--skip-padded", action="store_true")
    ap.add_argument("--profile", action="store_true", help=f"{PROFILE_STEPS} more packed steps under torch.profiler, "
                    "after the timed ones: GPU busy share, kernel time by kind, top kernels (pretrain.profiling)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.peak_tflops = args.peak_tflops or peak_flops_of(device_name()) / 1e12

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = (ModelConfig.preset("nano", dim=64, num_layers=2, num_heads=4) if args.tiny
           else ModelConfig.preset(args.preset))
    result = {"date": time.strftime("%Y-%m-%d"), "device": device_name(), "peak_tflops": args.peak_tflops,
              "torch": torch.__version__, "model": "tiny" if args.tiny else args.preset,
              "params": _num_parameters(cfg),
              "command": " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(argv)}
    # kept when the run fails: its trainer log says how far it got (bench/gpu/runner.py reads it)
    tmp = Path(tempfile.mkdtemp(prefix="pretrain_bench_"))
    shards = args.shards or build_shards(args.corpus, tmp / "shards")
    result["packed"] = packed_run(args, shards, tmp / "run")
    shutil.rmtree(tmp)
    lengths = corpus_lengths(args.corpus)
    if args.tiny:
        lengths = np.minimum(lengths, 256)
    result["corpus_mean_tokens"] = float(lengths.mean())
    write_result(result, args.out, echo=args.skip_padded)  # the packed numbers, whatever becomes of the padded
    if not args.skip_padded:
        try:
            result["padded"] = padded_run(args, cfg, lengths, device)
        except Exception as e:  # e.g. CUDA out of memory at B=192: said in the result, and the step fails
            result["padded_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            write_result(result, args.out, echo=False)
            raise
        # per device: the padded run is one process
        result["packed_over_padded"] = (result["packed"]["real_tokens_per_s_per_gpu"]
                                        / result["padded"]["real_tokens_per_s"])
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
