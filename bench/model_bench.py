"""Packed (varlen) vs padded RiNALMo: numerical agreement and forward+backward throughput.

    python bench/model_bench.py --preset giga --dtype bf16 --out bench_model.json     # on the GPU
    python bench/model_bench.py --preset nano --dim 64 --layers 2 --heads 4 --budget 2048 --steps 2  # CPU logic

Lengths are drawn from the ncRNA corpus (CLS/EOS added, cropped to 1024 tokens).
- agreement: the same sequences through the packed path (fastest backend) and through the padded
  [B, L] path with the SDPA backend (padded attention + key-padding mask); relative L2 error of the
  logits and of all parameter gradients, each against a float32 packed reference.
  Every other CUDA kernel backend (e.g. torch_flash beside torch_varlen) is compared the same way.
- attention_dropout: each backend that applies attention dropout, on v = 1 (output exactly 1 without dropout):
  with p = 0.1 the mean must stay ~1 (inverted scaling) and the values spread; one seed gives one mask; and the
  backward must replay the forward's mask (<out, g> = <v, dv>, the output being linear in v for a fixed mask).
- throughput: real (non-pad) tokens/s of forward+backward. Packed: micro-batches filled up to a token
  budget. Padded: batches of --padded-batch sequences, each padded to the batch's longest, every
  position computed (what a padded recipe pays).
- --ffn-align 1: the packed throughput again with the FFN matmuls at another width (ModelConfig.ffn_align, default
  64; same weights): at 1, giga's original 3413, whose GEMM rows are not 16-byte aligned.
MFU = model.flops_per_token summed over real tokens / time / peak (the GPU's dense bf16 peak, pretrain.mfu: 989
TFLOP/s for H100/H200 SXM; recorded as peak_tflops); the
FLOPs are the model's own (3413 wide), whatever width the matmuls run at.
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pretrain.mfu import device_name, peak_flops_of
from rnalm.attention import BACKENDS, KERNEL_DTYPES, WITHOUT_DROPOUT, available_backends, resolve_backend
from rnalm.batch import PackedBatch
from rnalm.config import ModelConfig
from rnalm.files import atomic_write
from rnalm.model import RiNALMo
from rnalm.tokenizer import PAD_ID

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "data" / "ncrna" / "ncrna_corpus.fasta.gz"
MAX_TOKENS = 1024


def corpus_lengths(path: Path) -> np.ndarray:
    """Token lengths (nt + CLS/EOS, cropped to 1024) of every record of a FASTA(.gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    lengths, current = [], 0
    with opener(path, "rb") as fh:
        for line in fh:
            if line.startswith(b">"):
                if current:
                    lengths.append(current)
                current = 0
            else:
                current += len(line.strip())
    if current:
        lengths.append(current)
    return np.minimum(np.array(lengths) + 2, MAX_TOKENS)


def random_tokens(length: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(5, 9, size=length)


def packed_batches(lengths: np.ndarray, budget: int, rng: np.random.Generator, count: int) -> list[PackedBatch]:
    batches = []
    for _ in range(count):
        seqs, used = [], 0
        while True:
            n = int(rng.choice(lengths))
            if used + n > budget:
                break
            seqs.append(random_tokens(n, rng))
            used += n
        batches.append(PackedBatch.from_sequences(seqs))
    return batches


def padded_batches(lengths: np.ndarray, batch: int, rng: np.random.Generator, count: int):
    """(PackedBatch of batch x Lmax positions all computed, real lengths)."""
    out = []
    for _ in range(count):
        ns = rng.choice(lengths, size=batch)
        width = int(ns.max())
        rows = [np.concatenate([random_tokens(int(n), rng), np.full(width - n, PAD_ID)]) for n in ns]
        out.append((PackedBatch.from_sequences(rows), torch.as_tensor(ns)))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def grads(model: RiNALMo) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def agreement(model: RiNALMo, lengths, rng, device, dtype) -> dict:
    seqs = [random_tokens(int(n), rng) for n in rng.choice(lengths, size=16)]
    batch = PackedBatch.from_sequences(seqs).to(device)
    padded = torch.full((len(seqs), max(len(s) for s in seqs)), PAD_ID, dtype=torch.long)
    for row, s in zip(padded, seqs):
        row[: len(s)] = torch.as_tensor(s)
    padded = padded.to(device)
    real = padded != PAD_ID
    results = {}

    def run(fn, autocast_dtype, backend):
        model.attention_backend = backend
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            logits = fn()
        logits.float().square().mean().backward()
        return logits.detach().float(), grads(model)

    backend = model.attention_backend
    # the fp32 reference: 'auto' resolves per dtype, to sdpa where the kernels take only bf16/fp16 (CUDA)
    ref_logits, ref_grads = run(lambda: model.forward_packed(batch).logits, torch.float32, "auto")
    results["packed_backend"] = backend
    pk_logits, pk_grads = run(lambda: model.forward_packed(batch).logits, dtype, backend)
    pd_logits, pd_grads = run(lambda: model(padded).logits[real], dtype, "sdpa")
    for other in available_backends(device):
        if other not in (backend, "sdpa") and dtype in KERNEL_DTYPES:
            logits, grad = run(lambda: model.forward_packed(batch).logits, dtype, other)
            results.setdefault("other_backends", {})[other] = {
                "vs_fp32_logits": rel_err(logits, ref_logits), "vs_fp32_grads": rel_err(grad, ref_grads),
                "vs_packed_logits": rel_err(logits, pk_logits), "vs_packed_grads": rel_err(grad, pk_grads)}
    model.attention_backend = backend
    results.update(packed_vs_fp32_logits=rel_err(pk_logits, ref_logits), padded_vs_fp32_logits=rel_err(pd_logits, ref_logits),
                   packed_vs_padded_logits=rel_err(pk_logits, pd_logits), packed_vs_fp32_grads=rel_err(pk_grads, ref_grads),
                   padded_vs_fp32_grads=rel_err(pd_grads, ref_grads), packed_vs_padded_grads=rel_err(pk_grads, pd_grads))
    return results


def attention_dropout(backend: str, device: torch.device, p: float = 0.1) -> dict:
    """Attention alone, 32 sequences of 128 tokens, bf16. With v = 1 every output is 1 without dropout, so with it
    the mean stays ~1 (inverted scaling; flash keeps a probability at floor(0.9 x 255) / 256, mean ~0.998) and the
    values spread; one seed, one mask. With random v and output gradient g the output is linear in v for a fixed
    mask, so <out, g> = <v, dv> when the backward replays the forward's mask (bf16 rounding apart) and not when it
    draws another: `mask_replay_rel_err`, at p = 0.5 (~3e-4 on the CPU's SDPA; ~1.5 with another mask)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, g = (torch.randn(32 * 128, 20, 64, generator=gen).to(device, torch.bfloat16) for _ in range(4))
    cu = torch.arange(0, 32 * 128 + 1, 128, device=device, dtype=torch.int32)

    def once(seed: int, values: torch.Tensor, dropout: float = p):
        torch.manual_seed(seed)
        values = values.clone().requires_grad_()
        out = BACKENDS[backend](q, k, values, cu, 128, dropout)
        out.backward(g)
        return out.detach().double(), values.grad.double()

    ones = torch.ones_like(v)
    (a, grad_a), (b, grad_b), (c, _) = once(1, ones), once(1, ones), once(2, ones)
    out, dv = once(3, v, 0.5)  # half the probabilities dropped: another mask moves <v, dv> by ~100%, rounding ~0.1%
    lhs, rhs = torch.vdot(out.flatten(), g.double().flatten()), torch.vdot(v.double().flatten(), dv.flatten())
    return {"p": p, "mean": a.mean().item(), "std": a.std().item(),
            "same_seed_same_mask": bool(torch.equal(a, b) and torch.allclose(grad_a, grad_b, rtol=1e-2, atol=1e-2)),
            "other_seed_other_mask": not torch.equal(a, c),
            "mask_replay_rel_err": float((lhs - rhs).abs() / lhs.abs().clamp_min(1e-12))}


def throughput(model: RiNALMo, batches, device, dtype, warmup: int) -> dict:
    """batches: list of (PackedBatch, real lengths). Times forward+backward of the MLM logits;
    FLOPs count the real tokens only."""
    def step(b: PackedBatch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model.forward_packed(b).logits.float().logsumexp(-1).mean()
        loss.backward()

    for b, _ in batches[:warmup]:
        step(b.to(device))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start, real, flops = time.perf_counter(), 0, 0.0
    for b, real_lengths in batches[warmup:]:
        step(b.to(device, non_blocking=True))
        real += int(real_lengths.sum())
        flops += model.training_flops(real_lengths)
    sync()
    elapsed = time.perf_counter() - start
    out = {"real_tokens_per_s": real / elapsed, "model_flops_per_s": flops / elapsed, "steps": len(batches) - warmup}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="giga")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--padded-batch", type=int, default=192)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ffn-align", type=int, nargs="*", default=[],
                    help="also time the packed path with these ModelConfig.ffn_align values")
    ap.add_argument("--peak-tflops", type=float, help="per device, for MFU (default: the GPU's dense bf16 peak, "
                    "pretrain.mfu.PEAK_BF16_DENSE_FLOPS; H100 SXM's 989 when unknown)")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.peak_tflops = args.peak_tflops or peak_flops_of(device_name()) / 1e12

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    overrides = {k: v for k, v in (("dim", args.dim), ("num_layers", args.layers), ("num_heads", args.heads)) if v}
    cfg = ModelConfig.preset(args.preset, attn_dropout=0.0, residual_dropout=0.0, **overrides)
    torch.manual_seed(0)
    with device:
        model = RiNALMo(cfg)
    model.attention_backend = resolve_backend("auto", device, dtype=dtype)
    rng = np.random.default_rng(0)
    lengths = corpus_lengths(args.corpus)
    result = {"device": device_name(), "peak_tflops": args.peak_tflops, "torch": torch.__version__,
              "preset": args.preset, "dtype": args.dtype, "params": model.num_parameters(),
              "corpus_mean_tokens": float(lengths.mean()), "budget": args.budget, "padded_batch": args.padded_batch}
    def save() -> None:  # what is measured so far, should a later part fail
        write_result(result, args.out, echo=False)

    result["agreement"] = agreement(model, lengths, rng, device, dtype)
    save()
    result["attention_dropout"] = {b: attention_dropout(b, device) for b in available_backends(device)
                                   if b not in WITHOUT_DROPOUT}
    save()

    def timed(key: str, m: RiNALMo, batches) -> None:
        r = result[key] = throughput(m, batches, device, dtype, args.warmup)
        r["mfu"] = r["model_flops_per_s"] / (args.peak_tflops * 1e12)
        r["vs_packed"] = r["real_tokens_per_s"] / result["packed"]["real_tokens_per_s"]
        save()

    n = args.steps + args.warmup
    packed = [(b, b.lengths) for b in packed_batches(lengths, args.budget, rng, n)]
    timed("packed", model, packed)
    timed("padded", model, padded_batches(lengths, args.padded_batch, rng, n))
    result["packed_over_padded"] = 1 / result["padded"]["vs_packed"]
    save()
    for align in args.ffn_align:
        with device:
            aligned = RiNALMo(replace(cfg, ffn_align=align))
        aligned.load_state_dict(model.state_dict())
        aligned.attention_backend = model.attention_backend
        timed(f"packed_ffn_align{align}", aligned, packed)
        del aligned
    write_result(result, args.out)


def write_result(result: dict, out: Path | None, echo: bool = True) -> None:
    """A bench's JSON to stdout (unless not `echo`: a partial result, written again later) and, with --out, to
    that file (whole or not at all: a step killed mid-write leaves the previous one)."""
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if out:
        atomic_write(out, text + "\n")


if __name__ == "__main__":
    main()
