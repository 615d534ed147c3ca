"""Model configuration: the exact RiNALMo hyper-parameters, with the four original sizes as presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from rnalm.tokenizer import VOCAB_SIZE

# name -> (dim, num_layers); all original sizes use 20 heads.
PRESETS: dict[str, tuple[int, int]] = {
    "nano": (320, 6),
    "micro": (480, 12),
    "mega": (640, 30),
    "giga": (1280, 33),
}
ATTENTION_BACKENDS = ("auto", "torch_varlen", "flash_attn", "torch_flash", "sdpa")
# Token dropout rescales by (1 - this) / (1 - observed mask ratio): 15% selected x 80% <mask>.
MASK_RATIO_TRAIN = 0.15 * 0.8
# ModelConfig fields that say how one machine runs the model, not what it computes
MACHINE_CHOICES = ("attention_backend", "activation_checkpointing", "ffn_align")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "giga"
    dim: int = 1280
    num_layers: int = 33
    num_heads: int = 20
    vocab_size: int = VOCAB_SIZE
    attn_dropout: float = 0.1
    residual_dropout: float = 0.1
    transition_dropout: float = 0.0
    token_dropout: bool = True
    mask_ratio_train: float = MASK_RATIO_TRAIN
    rope_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    attention_backend: str = "auto"     # auto | torch_varlen | flash_attn | torch_flash | sdpa
    activation_checkpointing: bool | int = False   # True: every block; an int n: the first n blocks
    # the FFN matmuls run at its width rounded up to this (zero padding; weights and results unchanged): 64 gives GPU
    # GEMMs 16-byte-aligned rows (giga 3413 -> 3456: 1.73x the training tokens/s on an H200); 1: the original width
    ffn_align: int = 64

    def __post_init__(self) -> None:
        for key in ("dim", "num_layers", "num_heads", "vocab_size", "ffn_align"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("attn_dropout", "residual_dropout", "transition_dropout", "mask_ratio_train", "layer_norm_eps",
                    "rope_base"):  # (a hand-written config.json's "0.1" or true must not pass for a number)
            if not isinstance(getattr(self, key), (int, float)) or isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be a number, got {getattr(self, key)!r}")
        for key in ("attn_dropout", "residual_dropout", "transition_dropout", "mask_ratio_train"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)!r}")
        if not isinstance(self.token_dropout, bool):  # ("false", a string, was true)
            raise ValueError(f"token_dropout must be true or false, got {self.token_dropout!r}")
        if not (self.layer_norm_eps > 0 and self.rope_base > 0):
            raise ValueError(f"layer_norm_eps and rope_base must be > 0, got {self.layer_norm_eps}, {self.rope_base}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not isinstance(self.activation_checkpointing, (bool, int)) or self.activation_checkpointing < 0:
            raise ValueError(f"activation_checkpointing must be true, false or a block count >= 0, "
                             f"got {self.activation_checkpointing}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def checkpointed_blocks(self) -> int:
        """How many blocks (the first ones) recompute their forward in the backward pass."""
        ac = self.activation_checkpointing
        return (self.num_layers if ac else 0) if isinstance(ac, bool) else min(ac, self.num_layers)

    @property
    def ffn_dim(self) -> int:
        return int(2 / 3 * 4 * self.dim)

    @property
    def ffn_width(self) -> int:
        """The FFN width the matmuls see: ffn_dim rounded up to a multiple of ffn_align."""
        return -(-self.ffn_dim // self.ffn_align) * self.ffn_align

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        dim, layers = PRESETS[name]
        cfg = replace(cls(name=name, dim=dim, num_layers=layers), **overrides)
        if (cfg.dim, cfg.num_layers, cfg.num_heads) != (dim, layers, cls.num_heads):
            cfg = replace(cfg, name=f"{name}-custom")  # a resized preset is not that model: say so in every label
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def released(self) -> "ModelConfig":
        """The machine choices (attention kernel, recomputation, GEMM padding) back at their defaults: what a saved
        model records, and what a loaded one starts from, so a model loads anywhere (a pretraining run's
        torch_varlen has no CPU kernel) and runs as fast as the defaults allow (files saved before ffn_align's
        default became 64 record 1)."""
        return replace(self, **{f.name: f.default for f in fields(self) if f.name in MACHINE_CHOICES})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**data)
