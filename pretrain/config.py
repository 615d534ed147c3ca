"""Pretraining run config: typed sections (model, data, optim, train, checkpoint, metrics) for rnalm.configfile.

Defaults reproduce RiNALMo's recipe: AdamW, peak LR 5e-5 after 2000 linear warm-up steps, cosine to 1e-5,
weight decay 0.01, gradient clipping 1.0, 15% masking 80/10/10, dropout 0.1.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pretrain.data import DataConfig
from pretrain.data.masking import MASK_TOKEN_SHARE
from rnalm.config import ModelConfig
from rnalm.configfile import merge_dicts
from rnalm.files import check_out_dir

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ModelSection:
    """A preset (nano/micro/mega/giga) plus optional overrides of its size and dropouts."""

    preset: str = "giga"
    dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    attn_dropout: float | None = None
    residual_dropout: float | None = None
    attention_backend: str = "auto"
    activation_checkpointing: bool | int = False   # true: every block; n: the first n blocks
    compile: bool = False           # torch.compile each block around attention; pads micro-batches to the budget
    ffn_align: int | None = None    # FFN matmuls at a width rounded up to this; None: the model's default (64)

    def build(self) -> ModelConfig:
        overrides = {k: v for k, v in vars(self).items() if k not in ("preset", "compile") and v is not None}
        return ModelConfig.preset(self.preset, **overrides)


@dataclass
class OptimConfig:
    lr: float = 5e-5                # peak
    min_lr: float = 1e-5            # cosine floor
    warmup_start_lr: float = 1e-7
    warmup_steps: int = 2000
    decay_steps: int | None = None  # cosine horizon after warm-up; None: train.max_steps - warmup_steps
    weight_decay: float = 0.01      # on matrices only (no decay on biases, LayerNorms, SwiGLU beta)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    # auto: torch's fused kernel on CUDA, its multi-tensor one elsewhere; deepspeed: DeepSpeed's FusedAdam (JIT-built)
    adamw: Literal["auto", "torch", "torch_fused", "deepspeed"] = "auto"


@dataclass
class TrainConfig:
    RETIRED: ClassVar[dict[str, str]] = {  # keys of older configs: what a run's config.yaml holding one should say
        "valid_max_batches": "it counted batches per rank; train.valid_max_records counts records at any world size"}
    out_dir: str = "runs/pretrain"
    max_steps: int = 76_000               # optimizer steps (RiNALMo: ~76k steps of 1344 sequences; a step here is
                                          # tokens, see docs/pretrain.md "Batch size and epochs")
    stop_after: int | None = None         # save and exit at this step (chunked jobs); the schedule keeps max_steps
    grad_accum: int = 1                   # micro-batches (each data.token_budget tokens per rank) per step
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # auto: bf16 on GPU, fp32 on CPU
    ds_config: str = "ds_configs/zero3.json"               # relative to the repository or absolute
    ds_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the JSON (nested dicts)
    zero_init: bool = False               # build the model inside deepspeed.zero.Init (giant models)
    init_weights: str = ""                # a fresh run starts from these weights (pretrain.convert output, the
                                          # original's .pt, multimolecule); a resume takes its checkpoint's
    seed: int = 0
    log_every: int = 10                   # progress line on stderr; log.jsonl gets every step
    valid_every: int = 1000               # 0: never
    valid_max_records: int = 50_000       # the held-out split's first N records (seeded order), shared by the
                                          # ranks: the same records at any world size; 0: the whole split
    valid_split: str = "valid"
    valid_sampling: Literal["cluster", "uniform"] = "uniform"
    max_nonfinite_in_row: int = 10        # stop the run after this many skipped steps in a row
    profile_at: int = 0                   # profile 3 steps from this one on rank 0 (0: off): out_dir/profile/ and a
                                          # "profile" event in log.jsonl (pretrain.profiling)
    inject_nonfinite_at: list[int] = field(default_factory=list)  # fault injection for tests: in these step
                                                                   # attempts one micro-batch's loss is made
                                                                   # NaN on the last rank:
    inject_nonfinite_micro: int = -1      # that micro-batch's index in the step (-1: the last)


@dataclass
class CheckpointConfig:
    every: int = 1000                 # steps; 0: only on signals, stop_after and at the end
    keep: int = 3                     # newest K kept
    resume: bool = True               # auto-resume from the newest good checkpoint in out_dir/checkpoints
    save_at_end: bool = True


@dataclass
class MetricsConfig:
    enabled: bool = True
    bind: str = "0.0.0.0"
    port_base: int = 9500             # port = port_base + LOCAL_RANK; 0: a free port (written to the log)
    peak_flops: float | None = None   # per device, for MFU; None: the GPU's dense bf16 peak (pretrain.mfu)
    run_id: str = ""                  # default: the out_dir name
    final_scrape_s: float = 30.0      # after a non-finite stop the endpoint stays up this long (two scrapes of
                                      # deploy/prometheus), so RnalmLossNotFinite sees the final count


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(shards=""))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def validate_data(self) -> None:
        """What evaluation checks too: the shards, the masking, the model."""
        if not self.data.shards:
            raise ValueError("data.shards is not set: give the dataprep output dir (--data.shards=DIR)")
        if not self.data.mask_prob > 0:  # (the loss was 0 at every step, and validation blamed the shards)
            raise ValueError(f"data.mask_prob must be > 0 (the share of tokens predicted), got {self.data.mask_prob}")
        self.model_config()

    def validate(self) -> None:
        """Every check a training run makes before start-up."""
        self.validate_data()
        t, o = self.train, self.optim
        if not self.data.infinite or self.data.max_records:  # (the run crashed at the end of its first epoch)
            raise ValueError("data.infinite=false and data.max_records are the validation pass's (train.valid_*): "
                             "training streams its split without end")
        least = {"train.grad_accum": (t.grad_accum, 1), "train.max_steps": (t.max_steps, 1),
                 "train.log_every": (t.log_every, 1), "train.stop_after": (t.stop_after, 1),
                 "train.valid_every": (t.valid_every, 0), "train.valid_max_records": (t.valid_max_records, 0),
                 "checkpoint.every": (self.checkpoint.every, 0), "checkpoint.keep": (self.checkpoint.keep, 1),
                 "optim.warmup_steps": (o.warmup_steps, 0), "optim.decay_steps": (o.decay_steps, 1),
                 "optim.min_lr": (o.min_lr, 0), "optim.warmup_start_lr": (o.warmup_start_lr, 0),
                 "train.seed": (t.seed, 0), "train.profile_at": (t.profile_at, 0),
                 "metrics.final_scrape_s": (self.metrics.final_scrape_s, 0), "optim.grad_clip": (o.grad_clip, 0),
                 "optim.weight_decay": (o.weight_decay, 0), "optim.eps": (o.eps, 0),
                 "train.max_nonfinite_in_row": (t.max_nonfinite_in_row, 1)}
        for key, (value, low) in least.items():
            if value is not None and value < low:
                raise ValueError(f"{key} must be >= {low}, got {value}")
        if not -t.grad_accum <= t.inject_nonfinite_micro < t.grad_accum:
            raise ValueError(f"train.inject_nonfinite_micro must index one of the train.grad_accum={t.grad_accum} "
                             f"micro-batches of a step, got {t.inject_nonfinite_micro}")
        peak = self.metrics.peak_flops
        if not 0 < o.lr or o.min_lr > o.lr or o.warmup_start_lr > o.lr or (peak is not None and not 0 < peak):
            raise ValueError(f"need 0 < optim.lr (got {o.lr}), optim.min_lr and optim.warmup_start_lr <= optim.lr "
                             f"(got {o.min_lr}, {o.warmup_start_lr}) and metrics.peak_flops > 0 (got {peak})")
        if t.profile_at > t.max_steps:
            raise ValueError(f"train.profile_at ({t.profile_at}) is past train.max_steps ({t.max_steps}): no step "
                             "would be profiled")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
        if self.optim.warmup_steps >= self.train.max_steps and self.optim.decay_steps is None:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be below train.max_steps "
                             f"({self.train.max_steps}) or set optim.decay_steps")
        if self.train.init_weights and not Path(self.train.init_weights).exists():
            raise ValueError(f"train.init_weights: {self.train.init_weights} does not exist")
        if not 0 <= self.metrics.port_base <= 65535 - 16:   # room for the local ranks' ports above it
            raise ValueError(f"metrics.port_base must be 0 (free ports) or a port up to 65519, got "
                             f"{self.metrics.port_base}")
        check_out_dir(self.train.out_dir, "train.out_dir")
        deepspeed_config(self, bf16=False)  # readable, and without the keys the trainer owns

    def model_config(self) -> ModelConfig:
        """The model section's, with token dropout's training mask ratio from data.mask_prob: the embeddings are
        rescaled by it in training and after (the presets' 0.12 is the original's 0.15 x 0.8)."""
        return replace(self.model.build(), mask_ratio_train=self.data.mask_prob * MASK_TOKEN_SHARE)

    def valid_data(self) -> DataConfig:
        """The held-out split: one deterministic pass over its first valid_max_records records (every one, not one
        per cluster, unless valid_sampling says so)."""
        return replace(self.data, split=self.train.valid_split, sampling=self.train.valid_sampling,
                       infinite=False, max_records=self.train.valid_max_records)


# Keys the trainer owns; a DeepSpeed JSON that sets them is rejected so there is one source of truth.
TRAINER_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def deepspeed_config(cfg: PretrainConfig, bf16: bool, universal: bool = False) -> dict[str, Any]:
    """The JSON file (ZeRO settings) + ds_overrides + the keys the trainer owns; `universal`: the run resumes
    from a universal checkpoint."""
    path = Path(cfg.train.ds_config)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read DeepSpeed config {path}: {e}") from e
    ds = merge_dicts(ds, cfg.train.ds_overrides)
    if not isinstance(ds.get("zero_optimization", {}), dict):
        raise ValueError(f"{path} + train.ds_overrides: zero_optimization must be a mapping, got "
                         f"{ds['zero_optimization']!r}")
    owned = [k for k in TRAINER_OWNED_DS_KEYS if k in ds]
    if owned:
        raise ValueError(f"{path}: keys {owned} are set by the trainer from the run config "
                         f"(train.grad_accum, optim.grad_clip, train.precision); remove them")
    ds.update({
        # One micro-batch is one packed batch of data.token_budget tokens; DeepSpeed only counts it.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    })
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):  # (stage 0 trained with no gradient norm, and its checkpoints cannot be converted)
        raise ValueError(f"{path} + train.ds_overrides: zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    if bf16:
        # Gradients summed in fp32 over ranks and (ZeRO-2/3) micro-batches, as the original's DDP, torchtitan and
        # Megatron do: DeepSpeed's default for bf16 sums them in bf16, where a rank's or a micro-batch's gradient
        # below 1/256 of the running sum is lost. Costs the reduce-scatter twice the bytes (BENCHMARKS.md, ZeRO-3
        # communication); the file or ds_overrides may set either back to bf16. ZeRO-1 keeps bf16 micro-batch
        # sums: DeepSpeed gives it fp32 ones only through its BF16_Optimizer, whose checkpoints zero_to_fp32
        # (pretrain.convert) cannot read.
        ds.setdefault("communication_data_type", "fp32")
        if stage >= 2:
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    if stage == 3:
        # ZeRO-3 otherwise swaps F.linear for an autograd.Function that keeps no view of a gathered weight from the
        # forward to the backward pass (torch's keeps weight.t(): at most one bf16 copy of the model, 1.3 GB for
        # giga). It adds Python per call, and under torch.compile dynamo (torch 2.11) guarded on each weight's
        # ds_id: one recompilation per block, eager past recompile_limit (8 of 33 blocks compiled on the H200)
        ds["zero_optimization"]["memory_efficient_linear"] = False
    return ds


def main(argv: list[str] | None = None) -> None:
    """`python -m pretrain.config CONFIG [--section.key=value ...] section.key ...`: the values the trainer
    would use, one per line (true/false for booleans), for shell scripts such as deploy/slurm/pretrain.sh."""
    import sys

    from rnalm.configfile import ConfigError, load

    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.exit(main.__doc__)
    overrides = [a for a in args[1:] if a.startswith("--")]
    try:
        cfg = load(PretrainConfig, args[0], overrides)
        for key in (a for a in args[1:] if not a.startswith("--")):
            section, name = key.split(".", 1)
            value = getattr(getattr(cfg, section), name)
            print(str(value).lower() if isinstance(value, bool) else value)
    except (ConfigError, AttributeError, ValueError) as e:
        sys.exit(f"python -m pretrain.config: error: {e}")


if __name__ == "__main__":
    main()
