"""Language model + task head, and loading of every checkpoint kind finetune accepts.

Backbones: a converted directory (`model.safetensors` + `config.json`, via rnalm.io), the
original's `*_pretrained.pt` (or a fine-tuned `*_ft.pt`, whose `lm.`/`rinalmo.` part is used), multimolecule
weights (file, or an HF directory with `model.safetensors`/`pytorch_model.bin`), or a random initialisation
of a preset (the from-scratch baseline). Fine-tuned models are saved as `finetuned.safetensors` (tensors
`lm.*` and `pred_head.*`) + `finetune.json` (task, model config, head config, threshold or scaler, metrics).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rnalm import io as rio
from rnalm.config import ModelConfig
from rnalm.files import atomic_write
from rnalm.model import RiNALMo
from rnalm.runlock import RunLock

FT_WEIGHTS, FT_META = "finetuned.safetensors", "finetune.json"
TASK_META = {"ss": ("threshold",), "splice": ("classes",), "mrl": ("scaler",), "classify": ("classes",),
             "regress": ("scaler",)}  # beside task, model, head


@dataclass
class BackboneConfig:
    path: str | None = None          # converted dir, original .pt, multimolecule file/dir, or a fine-tuned dir
    format: Literal["auto", "rnalm", "official", "multimolecule", "finetuned"] = "auto"
    random_preset: str | None = None  # e.g. "micro": randomly initialised model instead of `path`
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields: for random_preset (e.g. {dim: 64,
    # num_layers: 2, num_heads: 4}) or for imported weights (e.g. {num_heads: 4}: .pt files do not record heads)
    dropout: float | None = None     # override attention/residual dropout of the loaded config
    attention_backend: str | None = None


@dataclass
class ImportConfig:
    checkpoint: str = ""      # the original's ss_*_ft.pt
    out: str = "imported_ss"
    num_heads: int = 20       # all original sizes use 20 heads (not stored in .pt files)
    held_out_family: str = "auto"  # the ArchiveII family the model never saw: auto (from a name such as
    # ss_archiveII-5s_ft.pt), a family, or none (not an ArchiveII model); `ss evaluate` scores only that family


class TaskModel(nn.Module):
    """`lm` (RiNALMo) + `pred_head`; the padded forward `lm(tokens)` feeds the head."""

    def __init__(self, lm: RiNALMo, head: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.pred_head = head

    def forward(self, tokens: torch.Tensor) -> Any:
        rep = self.lm(tokens).representation  # a frozen LM keeps no activations: nothing of it requires grad
        head_dtype = next(self.pred_head.parameters()).dtype  # fp32 under autocast; model.to(dtype) changes it
        return self.pred_head(rep.to(head_dtype), tokens)


def detect_format(path: Path) -> str:
    """'finetuned' (a directory this package saved), else the released-weights format (rnalm.io.weights_format)."""
    if path.is_dir() and (path / FT_META).exists():
        return "finetuned"
    try:
        return rio.weights_format(path)
    except FileNotFoundError as e:
        if path.is_dir():
            raise FileNotFoundError(f"{e} (nor {FT_META})") from None
        raise


def random_config(cfg: BackboneConfig) -> ModelConfig:
    """The model of `random_preset` with the overrides (a ValueError naming a bad one); building it is cheap."""
    if cfg.path is not None:
        raise ValueError(f"model.path ({cfg.path}) and model.random_preset ({cfg.random_preset}): give one")
    try:
        return ModelConfig.preset(cfg.random_preset, **_overrides(cfg))
    except TypeError as e:  # dataclasses.replace: an unknown field
        raise ValueError(f"model.overrides {cfg.overrides}: {e}") from None


def _overrides(cfg: BackboneConfig) -> dict[str, Any]:
    overrides: dict[str, Any] = dict(cfg.overrides)
    if cfg.dropout is not None:
        overrides.update(attn_dropout=cfg.dropout, residual_dropout=cfg.dropout)
    if cfg.attention_backend is not None:
        overrides["attention_backend"] = cfg.attention_backend
    return overrides


def load_backbone(cfg: BackboneConfig) -> RiNALMo:
    """A RiNALMo from any accepted source (see module doc); dropout/backend overrides applied."""
    if cfg.random_preset is not None:
        return RiNALMo(random_config(cfg)).eval()
    overrides = _overrides(cfg)
    if cfg.path is None:
        raise ValueError("no backbone: set model.path (checkpoint) or model.random_preset (random init)")
    path = Path(cfg.path)
    if hint := _part_of_finetuned(path):  # its task model's weights, read as a backbone's
        raise ValueError(f"{path}: {hint}")
    # a file's layout is told by rnalm.io.read_weights from the one read it makes
    fmt = detect_format(path) if cfg.format == "auto" and path.is_dir() else cfg.format
    if fmt == "finetuned":
        return load_finetuned(path, **overrides)[0].lm
    try:
        mcfg, state = rio.read_weights(path, fmt, **overrides)
    except ValueError as e:
        if "num_heads" in str(e) and "num_heads" not in overrides:
            raise ValueError(f"{e}; on the command line: --model.overrides='{{num_heads: 4}}' (embed: "
                             f"--overrides='{{num_heads: 4}}')") from e
        raise
    return rio.with_weights(lambda: RiNALMo(mcfg), state).eval()


def backbone_files(cfg: BackboneConfig) -> list[list[Any]]:
    """[name, bytes, mtime in ns] of the backbone's files (the file, or those directly in its directory), so that
    results from other weights at the same path are told apart; [] for a random init."""
    if cfg.random_preset is not None or not cfg.path or not Path(cfg.path).exists():
        return []
    path = Path(cfg.path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in files]


def save_finetuned(model: TaskModel, out_dir: str | Path, meta: dict[str, Any], finished: bool = True) -> Path:
    """Weights + metadata, each written to a temp file and renamed. Both carry one save id, so a crash between
    the two renames leaves a pair that `load_finetuned` refuses, never one it silently mixes (another run's SS
    threshold or MRL scaler beside these weights). `finished=False`: a training run's best epoch so far, until
    `mark_finished`."""
    out = Path(out_dir)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    rio.write_saved_pair(out / FT_WEIGHTS, tensors, out / FT_META,
                         {**meta, "model": model.lm.config.released().to_dict(), "finished": finished}, durable=True)
    return out


def mark_finished(out_dir: str | Path) -> None:
    """The saved model is its training run's final one (its finetune.json rewritten, same save id)."""
    meta_path = Path(out_dir) / FT_META
    atomic_write(meta_path, json.dumps({**rio.read_json(meta_path), "finished": True}, indent=2, default=str) + "\n",
                 durable=True)


def remove_finetuned(out_dir: str | Path) -> None:
    """An earlier run's model, metadata and results (and an evaluation of it into OUT): a new run into OUT that
    dies before its first save must not leave them beside its own config and log, where evaluate and predict would
    take them for its own, nor their scores beside the new model."""
    out = Path(out_dir)
    for name in (FT_WEIGHTS, FT_META, "results.json", "results.md"):
        (out / name).unlink(missing_ok=True)
    remove_evaluation(out)


def remove_evaluation(out_dir: str | Path) -> None:
    """An earlier evaluation's scores and config: an evaluation into OUT that fails must not leave another
    model's scores beside its own config."""
    for name in ("eval_results.json", "eval_results.md", "evaluate_config.yaml"):
        (Path(out_dir) / name).unlink(missing_ok=True)


def _part_of_finetuned(path: Path) -> str | None:
    """The hint for a file of a fine-tuned model directory given where its directory belongs; None otherwise."""
    if path.is_file() and (path.parent / FT_META).is_file():
        return f"it is part of the fine-tuned model {path.parent}: pass that directory"
    return None


def _file_hint(path: Path) -> str:
    if hint := _part_of_finetuned(path):
        return hint
    if path.suffix == ".pt":  # most likely the original's ss_*_ft.pt (its issues #22, #34: FASTA -> structures)
        return (f"the original's ss_*_ft.pt is imported first: python -m finetune import-original-ss "
                f"--checkpoint={path} --out=DIR, then --model=DIR")
    return f"pass the directory `python -m finetune <task> train` wrote ({FT_META} + {FT_WEIGHTS})"


def load_finetuned(model_dir: str | Path, map_location: str | torch.device = "cpu", task: str | None = None,
                   **lm_overrides: Any) -> tuple[TaskModel, dict[str, Any]]:
    """The task model (on `map_location`) and its finetune.json; `task`: refuse a model of another task;
    `lm_overrides`: ModelConfig fields (dropout, attention backend)."""
    from finetune.heads import HeadConfig
    from finetune.tasks import build_head

    model_dir = Path(model_dir)
    meta_path = model_dir / FT_META
    if model_dir.is_file():
        raise rio.WeightsError(f"{model_dir} is a file, not a fine-tuned model directory; {_file_hint(model_dir)}")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: fine-tuned model directory not found")
    training = RunLock(model_dir).live_holder()
    if not meta_path.exists():
        hint = (" It holds a pretrained backbone: fine-tune it first, e.g. `python -m finetune ss train "
                f"--model.path={model_dir}`." if (model_dir / rio.CONFIG_NAME).exists() else "")
        if training:
            hint = f" A run trains into it now ({training}): it saves the model after its first epoch."
        raise FileNotFoundError(f"{model_dir} is not a fine-tuned model directory (no {FT_META}; written by "
                                f"`python -m finetune <task> train`).{hint}")
    meta = rio.read_json(meta_path)
    if training:
        print(f"warning: {model_dir} is being trained now ({training}): its weights are that run's best epoch so "
              "far, not its final model", file=sys.stderr)
    elif meta.get("finished") is False:
        print(f"warning: the run that trained {model_dir} stopped before its end (killed or failed; its log.jsonl "
              "shows how far it got): its weights are that run's best epoch so far, not its final model; train "
              "again into it to finish", file=sys.stderr)
    missing = [k for k in ("task", "model", *TASK_META.get(meta.get("task"), ())) if k not in meta]
    if missing:
        raise rio.WeightsError(f"{meta_path}: missing {', '.join(missing)}")
    if task is not None and meta["task"] != task:
        raise ValueError(f"{model_dir} is a fine-tuned '{meta['task']}' model, not '{task}'")
    rio.check_same_save(model_dir / FT_WEIGHTS, meta, meta_path)
    try:
        mcfg = rio.saved_model_config(meta, meta_path, **lm_overrides)
        head_cfg = HeadConfig(**meta.get("head", {}))
        state = rio.read_safetensors(model_dir / FT_WEIGHTS, map_location)
        model = rio.with_weights(lambda: TaskModel(RiNALMo(mcfg), build_head(meta["task"], mcfg.dim, head_cfg, meta)),
                                 state, map_location)
    except (TypeError, RuntimeError) as e:  # a config that builds no model, or weights that do not fit it
        raise rio.WeightsError(f"{model_dir}: {FT_WEIGHTS} and {FT_META} do not fit ({e})") from e
    return model.eval(), meta



def import_original_ss(checkpoint: str | Path, out_dir: str | Path, held_out_family: str = "auto",
                       **config_overrides: Any) -> Path:
    """The original's fine-tuned secondary-structure weights (`ss_*_ft.pt`: `lm.*`, `pred_head.*`, `threshold`)
    -> a fine-tuned directory that `predict-ss` and `ss evaluate` read. Head parameter names are the original's.
    An ArchiveII model records its held-out family, as our own do, so that `ss evaluate` scores it on no other."""
    from finetune.heads import HeadConfig, SecondaryStructureHead

    family = _held_out_family(Path(checkpoint), held_out_family)
    state = rio.read_state_dict(checkpoint)
    head_state = {k[len("pred_head."):]: v for k, v in state.items() if k.startswith("pred_head.")}
    if not head_state or "threshold" not in state:
        raise rio.WeightsError(f"{checkpoint}: not an original secondary-structure checkpoint "
                               f"(needs pred_head.* tensors and a threshold)")
    mcfg, lm_state = rio.import_official({k: v for k, v in state.items() if not k.startswith("pred_head.")},
                                         **config_overrides)
    lm = rio.with_weights(lambda: RiNALMo(mcfg), lm_state)
    blocks = {k.split(".")[2] for k in head_state if k.startswith("resnet.blocks.")}
    head_cfg = HeadConfig(ss_conv_dim=head_state["linear_in.weight"].shape[0], ss_num_blocks=len(blocks))
    head = SecondaryStructureHead(mcfg.dim, head_cfg)
    try:
        head.load_state_dict(head_state)
    except RuntimeError as e:
        raise rio.WeightsError(f"{checkpoint}: secondary-structure head does not fit: {e}") from None
    data = {} if family is None else {"data": {"dataset": "ArchiveII", "test": family}}
    return save_finetuned(TaskModel(lm, head), out_dir, {
        "task": "ss", "head": asdict(head_cfg), "threshold": float(state["threshold"]),
        "backbone": {"imported_from": str(checkpoint)}, **data})


def _held_out_family(checkpoint: Path, asked: str) -> str | None:
    """`auto`: the family in an original ArchiveII file name (`ss_archiveII-<family>_ft.pt`), else none."""
    from finetune.ss_data import ARCHIVEII_FAMILIES

    known = {f.lower(): f for f in ARCHIVEII_FAMILIES}
    if asked == "auto":
        named = re.search(r"archiveii-([a-z0-9]+)", checkpoint.name.lower())
        if named is None:
            return None
        if named.group(1) not in known:
            raise ValueError(f"{checkpoint}: the name says ArchiveII family {named.group(1)!r}, not one of "
                             f"{', '.join(ARCHIVEII_FAMILIES)}; set --held_out_family")
        return known[named.group(1)]
    if asked.lower() == "none":
        return None
    if asked.lower() not in known:
        raise ValueError(f"--held_out_family={asked}: use auto, none or one of {', '.join(ARCHIVEII_FAMILIES)}")
    return known[asked.lower()]
