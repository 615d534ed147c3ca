"""ZeRO communication per step, scaling efficiency and GPU-hours for RiNALMo, on paper (issue 7; no GPU, no torch).

Counted per GPU and per direction: a ring collective over g ranks sends, and receives, (g-1)/g of the full buffer
(sent + received = 2x). bf16 parameters (2 B), gradients reduced in fp32 (4 B: the trainer's communication_data_type
under bf16, pretrain/config.py; --grad-bytes 2 for bf16); fp32 Adam state is never sent. DeepSpeed 0.19.8
(.venv/.../deepspeed/runtime): ZeRO-3 gathers every non-persistent parameter in forward, and in backward again those
it released after their forward use, and reduce-scatters all gradients on EVERY micro-step (stage3.py
`partition_grads` adds the reduced partition when micro_step_id > 0; engine.py `allreduce_gradients`: "ZeRO stage
>= 2 communicates during non gradient accumulation boundaries as well"). A parameter stays gathered when its next
use lies within stage3_max_reuse_distance elements of the micro-step's trace (partitioned_param_coordinator.py
`__params_to_release`; 1e9 in ds_configs/zero3.json, so giga's backward re-gathers only its first blocks: measured
with 2 gloo ranks, 8 layers of 262,144: reuse distance 0 -> 8 layers re-gathered, 1.5M -> 5, 1e9 -> none);
parameters with numel <= stage3_param_persistence_threshold stay resident and are gathered once per step (stage3.py
`_post_step`). ZeRO-2: reduce-scatter per micro-step, parameter all-gather per step. ZeRO-1: gradient reduce and
parameter all-gather once per step. hpZ (ZeRO++) gathers in backward inside a node. Activation checkpointing's
recompute (each checkpointed block's forward again just before its backward) is in the trace only with
--ac-regather.
Time = bytes / (link bandwidth per direction x achievable bus-bandwidth fraction); no latency term. Micro-step
collectives overlap with compute, per-step ones do not. ZeRO-3's forward has 1/3 of the bytes and of the FLOPs,
so the whole-step overlap bound equals the per-phase one.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass

from rnalm.config import ModelConfig

ORIGINAL_A100_HOURS = 2350.0        # 7 x A100 for ~2 weeks (../shared/notes/rinalmo_facts.md, derived)
ORIGINAL_SEQUENCES = 17e6 * 6       # one sequence per cluster per epoch, 6 epochs
# ncrna_corpus.fasta.gz as the recipe samples it (one member per cluster per epoch): the mean over the 15,318
# train clusters of dataprep's defaults (MMseqs2, seed 0) of their members' mean tokens (incl. CLS/EOS, <= 1024);
# the per-record mean is 120.4, the large families being shorter than the singletons
CORPUS_MEAN_TOKENS = 123.92
SPEEDS = {"original padded": 3.9e3, "untuned packed": 41e3, "matmul ceiling": 200e3}  # real tokens/s per H100


def parameter_numels(cfg: ModelConfig) -> dict[str, int]:
    """numel of every RiNALMo parameter, by the model's parameter names (tests check them against rnalm.model)."""
    d, f, v = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    block = {"mh_attn.Wqkv.weight": 3 * d * d, "mh_attn.out_proj.weight": d * d,
             "attn_layer_norm.weight": d, "attn_layer_norm.bias": d,
             "transition.0.linear.weight": f * d, "transition.0.linear.bias": f,
             "transition.0.linear_gate.weight": f * d, "transition.0.linear_gate.bias": f, "transition.0.beta": 1,
             "transition.2.weight": d * f, "transition.2.bias": d, "out_layer_norm.weight": d, "out_layer_norm.bias": d}
    out = {"embedding.weight": v * d}
    out.update({f"transformer.blocks.{i}.{k}": n for i in range(cfg.num_layers) for k, n in block.items()})
    out.update({"transformer.final_layer_norm.weight": d, "transformer.final_layer_norm.bias": d,
                "lm_mask_head.linear1.weight": d * d, "lm_mask_head.linear1.bias": d,
                "lm_mask_head.layer_norm.weight": d, "lm_mask_head.layer_norm.bias": d,
                "lm_mask_head.linear2.weight": v * d, "lm_mask_head.linear2.bias": v})
    return out


@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float       # per GPU, per direction
    efficiency: float = 0.8   # achievable bus bandwidth / link bandwidth


@dataclass(frozen=True)
class Collective:
    name: str
    elements: int
    group: int
    link: Link
    per_micro_step: bool      # False: once per optimizer step, not overlapped with compute
    bytes_per_element: int = 2

    @property
    def bytes_per_gpu(self) -> float:
        return self.bytes_per_element * self.elements * (self.group - 1) / self.group

    @property
    def seconds(self) -> float:
        return self.bytes_per_gpu / (self.link.gbytes_per_s * 1e9 * self.link.efficiency)


@dataclass(frozen=True)
class Setup:
    stage: int                # 1, 2 or 3
    gpus: int
    link: Link
    node_link: Link | None = None   # set: ZeRO++ hpZ, backward gather inside a node of gpus_per_node over this
    gpus_per_node: int = 8
    persistence_threshold: int = 100_000
    max_reuse_distance: int = 1_000_000_000   # stage3_max_reuse_distance (ds_configs/zero3.json)
    ac_regather: bool = False
    grad_bytes: int = 4                       # per gradient element reduced: fp32, the trainer's for bf16


def _block(name: str) -> str | None:
    return ".".join(name.split(".")[:3]) if name.startswith("transformer.blocks.") else None


def zero3_gathers(numels: dict[str, int], s: Setup) -> dict[str, int]:
    """Elements ZeRO-3 all-gathers per micro-step in each phase. The trace: the parameters in model order, then the
    backward in reverse (checkpointed blocks recomputing their forward first); after a use, a non-persistent
    parameter is released unless its next use comes within max_reuse_distance elements of the trace."""
    trace = [("fwd", name) for name in numels]
    for unit in reversed([list(g) for _, g in itertools.groupby(numels, key=_block)]):
        recompute = [("recompute", name) for name in unit] if s.ac_regather and _block(unit[0]) else []
        trace += recompute + [("bwd", name) for name in reversed(unit)]
    before = list(itertools.accumulate((numels[name] for _, name in trace), initial=0))
    next_use, later = [None] * len(trace), {}
    for t in range(len(trace) - 1, -1, -1):
        next_use[t], later[trace[t][1]] = later.get(trace[t][1]), t
    gathered, live = dict.fromkeys(("fwd", "bwd", "recompute"), 0), set()
    for t, (phase, name) in enumerate(trace):
        if numels[name] <= s.persistence_threshold:
            continue
        if name not in live:
            gathered[phase] += numels[name]
            live.add(name)
        u = next_use[t]
        if u is None or before[u] - before[t + 1] >= s.max_reuse_distance:
            live.discard(name)
    return gathered


def collectives(numels: dict[str, int], s: Setup) -> list[Collective]:
    total = sum(numels.values())
    resident = sum(n for n in numels.values() if n <= s.persistence_threshold) if s.stage == 3 else 0
    grads = [Collective("grad reduce-scatter", total, s.gpus, s.link, per_micro_step=s.stage >= 2,
                        bytes_per_element=s.grad_bytes)]
    if s.stage < 3:
        return grads + [Collective("param all-gather after step", total, s.gpus, s.link, False)]
    gathered = zero3_gathers(numels, s)
    bwd = (Collective("bwd all-gather (hpZ)", gathered["bwd"], s.gpus_per_node, s.node_link, True) if s.node_link
           else Collective("bwd all-gather", gathered["bwd"], s.gpus, s.link, True))
    out = [Collective("fwd all-gather", gathered["fwd"], s.gpus, s.link, True), bwd, *grads,
           Collective("persistent all-gather", resident, s.gpus, s.link, False)]
    recompute = Collective("recompute all-gather", gathered["recompute"], s.gpus, s.link, True)
    return out + ([recompute] if s.ac_regather else [])


@dataclass(frozen=True)
class StepEstimate:           # per optimizer step; bytes per GPU per direction
    bytes_per_gpu: float
    comm_s: float
    compute_s: float
    efficiency_serial: float      # compute / (compute + all comm)
    efficiency_overlapped: float  # compute / (max(compute, micro-step comm) + per-step comm)
    break_even_tokens: float      # tokens per micro-step at which micro-step comm = compute


def estimate(colls: list[Collective], tokens_per_micro: int, grad_accum: int, tokens_per_s: float) -> StepEstimate:
    micro, step = [c for c in colls if c.per_micro_step], [c for c in colls if not c.per_micro_step]
    overlap_s, fixed_s = grad_accum * sum(c.seconds for c in micro), sum(c.seconds for c in step)
    compute_s = grad_accum * tokens_per_micro / tokens_per_s
    return StepEstimate(
        bytes_per_gpu=grad_accum * sum(c.bytes_per_gpu for c in micro) + sum(c.bytes_per_gpu for c in step),
        comm_s=overlap_s + fixed_s, compute_s=compute_s,
        efficiency_serial=compute_s / (compute_s + overlap_s + fixed_s),
        efficiency_overlapped=compute_s / (max(compute_s, overlap_s) + fixed_s),
        break_even_tokens=tokens_per_s * sum(c.seconds for c in micro))


def gpu_hours(sequences: float, mean_tokens: float, tokens_per_s: float, efficiency: float = 1.0) -> float:
    return sequences * mean_tokens / (tokens_per_s * efficiency) / 3600.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="giga")
    p.add_argument("--tokens-per-micro", type=int, default=32768, help="tokens per micro-batch per GPU")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--tokens-per-s", type=float, help="measured real tokens/s per GPU (adds a speed)")
    p.add_argument("--mean-tokens", type=float, help="another corpus's mean tokens per sequence for the hours table "
                   "(at the same tokens/s: longer sequences cost more attention FLOPs per token, +11%% at 1024)")
    p.add_argument("--ib-gbit", type=float, default=400.0, help="InfiniBand NIC per GPU, Gb/s per direction")
    p.add_argument("--nvlink-gbytes", type=float, default=450.0, help="NVLink per GPU, GB/s per direction")
    p.add_argument("--efficiency", type=float, default=0.8, help="achievable bus-bandwidth fraction")
    p.add_argument("--ac-regather", action="store_true", help="count activation checkpointing's re-gather")
    p.add_argument("--grad-bytes", type=int, default=4, choices=(2, 4),
                   help="bytes per reduced gradient element (4: fp32, the trainer's default; 2: bf16)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    numels, ga, tpm = parameter_numels(ModelConfig.preset(a.preset)), a.grad_accum, a.tokens_per_micro
    ib, nvl = Link("IB", a.ib_gbit / 8, a.efficiency), Link("NVLink", a.nvlink_gbytes, a.efficiency)
    speeds = {**SPEEDS, **({"measured": a.tokens_per_s} if a.tokens_per_s else {})}
    grads = {"grad_bytes": a.grad_bytes}
    z3 = {**grads, "ac_regather": a.ac_regather}
    setups = [(Setup(3, 8, nvl, **z3), ga), (Setup(3, 8, ib, **z3), ga), (Setup(3, 64, ib, **z3), ga),
              (Setup(3, 64, ib, node_link=nvl, **z3), ga), (Setup(3, 64, ib, **z3), 4 * ga),
              (Setup(2, 64, ib, **grads), ga), (Setup(1, 64, ib, **grads), ga), (Setup(1, 64, ib, **grads), 4 * ga)]
    scaling = [{"zero": s.stage, "hpz": s.node_link is not None, "gpus": s.gpus, "link": s.link.name, "grad_accum": g,
                "by_speed": {k: asdict(estimate(collectives(numels, s), tpm, g, v)) for k, v in speeds.items()}}
               for s, g in setups]
    z3_64 = collectives(numels, setups[2][0])
    means = {"corpus": CORPUS_MEAN_TOKENS, **({"given": a.mean_tokens} if a.mean_tokens else {})}
    hours = [{"speed": k, "tokens_per_s": v, **{m: gpu_hours(ORIGINAL_SEQUENCES, t, v) for m, t in means.items()},
              "corpus_64gpu_zero3_ib_serial": gpu_hours(ORIGINAL_SEQUENCES, CORPUS_MEAN_TOKENS, v,
                                                        estimate(z3_64, tpm, ga, v).efficiency_serial)}
             for k, v in speeds.items()]
    result = {"params": sum(numels.values()),
              "persistent_params": sum(n for n in numels.values() if n <= Setup.persistence_threshold),
              "tokens_per_micro": tpm, "means": means, "scaling": scaling, "gpu_hours": hours,
              "zero3_64_ib": [{"name": c.name, "gbytes_per_gpu": c.bytes_per_gpu / 1e9, "ms": c.seconds * 1e3,
                               "per_micro_step": c.per_micro_step} for c in z3_64]}
    print(json.dumps(result, indent=1) if a.json else render(result))
    return result


def render(r: dict) -> str:
    speeds = [k for k in r["scaling"][0]["by_speed"] if k != "original padded"]   # comm is noise at 3.9k
    means, cell = r["means"], lambda e: (f"{e['compute_s'] * 1e3:.0f}, {e['efficiency_serial']:.0%} / "
                                        f"{e['efficiency_overlapped']:.0%}, {e['break_even_tokens'] or 0:,.0f}")
    out = [f"{r['params']:,} parameters, {r['persistent_params']:,} persistent; {r['tokens_per_micro']:,} tokens per "
           "micro-batch per GPU; GB per GPU per direction", "", "| ZeRO-3, 64 GPUs, IB | GB | ms | when |",
           "|---" * 4 + "|"]
    out += [f"| {c['name']} | {c['gbytes_per_gpu']:.3f} | {c['ms']:.1f} | "
            f"{'micro-step' if c['per_micro_step'] else 'step'} |" for c in r["zero3_64_ib"]]
    out += ["", "| ZeRO | GPUs | link | GA | GB/step | comm ms/step | " + " | ".join(
        f"{k}: compute ms, efficiency serial / overlapped, break-even tokens" for k in speeds) + " |",
        "|---" * (6 + len(speeds)) + "|"]
    out += [f"| {w['zero']} | {w['gpus']} | {w['link']}{'+NVLink (hpZ)' if w['hpz'] else ''} | {w['grad_accum']} | "
            f"{w['by_speed'][speeds[0]]['bytes_per_gpu'] / 1e9:.2f} | "
            f"{w['by_speed'][speeds[0]]['comm_s'] * 1e3:.1f} | "
            + " | ".join(cell(w["by_speed"][k]) for k in speeds) + " |" for w in r["scaling"]]
    out += ["", "| speed | tokens/s per GPU | " + " | ".join(f"GPU-h, {t:.1f} tokens/seq ({m})" for m, t in
                                                           means.items()) + " | / 2,350 A100-h (corpus) | "
            "GPU-h, 64 GPUs ZeRO-3 IB serial (corpus) |", "|---" * (4 + len(means)) + "|"]
    out += [f"| {h['speed']} | {h['tokens_per_s']:,.0f} | " + " | ".join(f"{h[m]:,.0f}" for m in means)
            + f" | {h['corpus'] / ORIGINAL_A100_HOURS:.3f} | {h['corpus_64gpu_zero3_ib_serial']:,.0f} |"
            for h in r["gpu_hours"]]
    return "\n".join(out)


if __name__ == "__main__":
    main()
