"""Released weights: `model.safetensors` + `config.json`, and the original / multimolecule layouts.

Our parameter names are the original RiNALMo state-dict keys, so the official layout is ours;
multimolecule renames the tensors and re-indexes the vocabulary rows (its pad id is 0, ours 1).
Pickled `.pt` files are read only with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rnalm.config import PRESETS, ModelConfig
from rnalm.files import atomic_write, atomic_write_all, remove_stale_temps
from rnalm.model import RiNALMo
from rnalm.tokenizer import UNK_ID, VOCAB

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"
WEIGHT_FORMATS = ("auto", "rnalm", "official", "multimolecule")
FORMAT_VERSION = 1
StateDict = dict[str, torch.Tensor]
M = TypeVar("M", bound=torch.nn.Module)

# multimolecule's published 26-token vocabulary (HF checkpoints; pad id 0, RNA letters).
MULTIMOLECULE_VOCAB: tuple[str, ...] = (
    "<pad>", "<cls>", "<eos>", "<unk>", "<mask>", "<null>",
    "A", "C", "G", "U", "N", "R", "Y", "S", "W", "K", "M", "B", "D", "H", "V", ".", "X", "*", "-", "I",
)
# the 28-token vocabulary of its current releases (0.2.x): I moved, |, ? added
MULTIMOLECULE_VOCAB_28: tuple[str, ...] = (
    "<pad>", "<cls>", "<eos>", "<unk>", "<mask>", "<null>",
    "A", "C", "G", "U", "N", "R", "Y", "S", "W", "K", "M", "B", "D", "H", "V", "I", "X", "|", ".", "*", "-", "?",
)
MULTIMOLECULE_VOCABS = {len(v): v for v in (MULTIMOLECULE_VOCAB, MULTIMOLECULE_VOCAB_28)}
_OURS_TO_MM_TOKEN = {tok: ("U" if tok == "T" else tok) for tok in VOCAB}


class WeightsError(ValueError):
    """A weights file that does not fit the model: names the missing, extra or mis-shaped tensors."""


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in RiNALMo(cfg).state_dict().items()}


def check_state_dict(state: Mapping[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} != expected {tuple(expected[k])}"
                   for k in set(expected) & set(state) if state[k].shape != expected[k])
    problems = [f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for label, items in (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong)) if items]
    if problems:
        raise WeightsError(f"{where} does not match model {cfg.name} (dim {cfg.dim}, {cfg.num_layers} layers): "
                           + "; ".join(problems))


def save_pretrained(model_or_state: RiNALMo | Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                    config: ModelConfig | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` into out_dir durably, as `write_saved_pair`: the earlier pair stays
    until both are written, and a pair read_pretrained would mix is refused by its save id."""
    if isinstance(model_or_state, RiNALMo):
        config = config or model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    if config is None:
        raise ValueError("save_pretrained needs a config when given a state dict")
    check_state_dict(state, config, "state dict to save")
    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format_version": FORMAT_VERSION, "model": config.released().to_dict(),
            "tokenizer": {"vocab": list(VOCAB), "pad_id": VOCAB.index("<pad>"), "mask_id": VOCAB.index("<mask>")},
            "provenance": provenance or {}}
    write_saved_pair(out / WEIGHTS_NAME, tensors, out / CONFIG_NAME, meta, durable=True)
    return out


def write_saved_pair(weights: Path, tensors: Mapping[str, torch.Tensor], meta_path: Path, meta: Mapping[str, Any],
                     durable: bool = False) -> None:
    """Weights and their JSON, both with one save id (check_same_save compares them), written whole before either
    replaces the earlier pair: a save stopped in between the two renames (back to back) leaves a pair that is
    refused, not mixed, and one stopped before them the earlier pair. A killed save's temp file (giga: 2.6 GB,
    hidden) goes first."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(weights)
    save_id = uuid.uuid4().hex
    atomic_write_all([(weights, lambda p: save_file(dict(tensors), p, metadata={"format": "pt", "save_id": save_id})),
                      (meta_path, json.dumps({**meta, "save_id": save_id}, indent=2, default=str) + "\n")], durable)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def saved_model_config(meta: Mapping[str, Any], where: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """The `model` entry of a saved config.json / finetune.json, its machine choices at their defaults
    (ModelConfig.released), then `overrides`; a bad entry names the file."""
    try:
        saved = ModelConfig.from_dict(meta["model"]).released()
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{where}: no usable 'model' entry ({type(e).__name__}: {e})") from None
    return ModelConfig.from_dict({**saved.to_dict(), **overrides})


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that this machine has; a ValueError that says so, not one that blames a file."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a device ({e})") from None
    available = getattr(getattr(torch, dev.type, None), "is_available", None)  # torch.cuda, torch.xpu, ...
    if available is not None and not available():
        raise ValueError(f"device {device!r}: this machine has no {dev.type.upper()} device")
    return dev


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    check_device(device)
    try:
        return load_file(str(path), device=str(device))
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from e


def saved_id(path: str | os.PathLike) -> str | None:
    """The save id in a safetensors file's metadata (None in files written without one)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("save_id")
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from e


def check_same_save(weights: Path, meta: Mapping[str, Any], meta_path: Path) -> None:
    """Weights and their JSON written by one save (files written before save ids pass)."""
    weights_id = saved_id(weights)
    if None not in (weights_id, meta.get("save_id")) and meta["save_id"] != weights_id:
        raise WeightsError(f"{weights.parent}: {weights.name} and {meta_path.name} come from different saves (one "
                           "was interrupted between the two files): write them again")


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names without reading the tensors."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from e


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    if Path(model_dir).is_file():
        raise WeightsError(f"{model_dir} is a file: a model directory holds {WEIGHTS_NAME} and {CONFIG_NAME} "
                           "(read_weights reads any released weights, the original's .pt included)")
    path = Path(model_dir) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a model directory holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    meta = read_json(path)
    if "format_version" not in meta and "model" not in meta:  # another tool's (multimolecule's, a BERT's)
        raise WeightsError(f"{path} is not this tool's (no format_version; pretrain.convert and save_pretrained "
                           "write it); a multimolecule directory is read by read_weights")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise WeightsError(f"{path}: format_version {meta['format_version']!r}, this version reads up to "
                           f"{FORMAT_VERSION}: a newer rnalm wrote it")
    tokenizer = meta.get("tokenizer", {})
    if not isinstance(tokenizer, Mapping) or list(tokenizer.get("vocab", VOCAB)) != list(VOCAB):
        raise WeightsError(f"{path}: tokenizer vocabulary differs from RiNALMo's")
    return meta


def read_pretrained(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                    **config_overrides: Any) -> tuple[ModelConfig, StateDict]:
    """(config, state dict) of `model.safetensors` + `config.json` (strict, with named mismatches)."""
    meta = read_config(model_dir)
    cfg = saved_model_config(meta, Path(model_dir) / CONFIG_NAME, **config_overrides)
    path = Path(model_dir) / WEIGHTS_NAME
    check_same_save(path, meta, Path(model_dir) / CONFIG_NAME)
    state = read_safetensors(path, map_location)
    check_state_dict(state, cfg, str(path))
    return cfg, state


def load_pretrained(model_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                    **config_overrides: Any) -> RiNALMo:
    """Build a RiNALMo in eval mode from `model.safetensors` + `config.json`."""
    cfg, state = read_pretrained(model_dir, map_location, **config_overrides)
    return with_weights(lambda: RiNALMo(cfg), state, map_location).eval()


def with_weights(build: Callable[[], M], state: Mapping[str, torch.Tensor],
                 device: str | torch.device = "cpu") -> M:
    """`build()` holding `state` (strict load). Built on the meta device and given memory without the random
    initialisation that the weights replace anyway: giga's takes 2-5 s on a CPU, several times the read, and
    draws from the user's random stream."""
    with torch.device("meta"):
        module = build()
    unloaded = [name for name, _ in module.named_buffers() if name not in module.state_dict()]
    if unloaded:  # a non-persistent buffer is set by __init__ only: it would be left as uninitialised memory
        raise TypeError(f"{type(module).__name__} has buffers no state dict holds ({', '.join(unloaded)})")
    module.to_empty(device=device)
    module.load_state_dict(state)
    return module


# --- any released weights --------------------------------------------------------------------------

def weights_format(path: Path) -> str:
    """'rnalm' (a save_pretrained / pretrain.convert directory), 'official' (the original's .pt) or
    'multimolecule' (a file, or an HF directory with model.safetensors / pytorch_model.bin)."""
    if path.is_dir():
        cfg = path / CONFIG_NAME
        if cfg.exists() and "format_version" in read_json(cfg):
            return "rnalm"
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                if name == WEIGHTS_NAME and "embedding.weight" in safetensors_keys(path / name):
                    which = "another tool's" if cfg.exists() else "no"
                    raise FileNotFoundError(f"{path}: {name} in this tool's layout but {which} {CONFIG_NAME} "
                                            f"beside it (written with it by pretrain.convert / save_pretrained)")
                return "multimolecule"
        if (path / "checkpoints").is_dir() or (path / "latest").exists() or (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{path}: a training run or checkpoint, not released weights: convert it first "
                                    f"(python -m pretrain.convert {path} OUT_DIR, then use OUT_DIR)")
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}+{CONFIG_NAME} or multimolecule weights")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
    return _file_format(read_state_dict(path))


def _file_format(state: Mapping[str, torch.Tensor]) -> str:
    return "multimolecule" if any(k.startswith("model.embeddings.") for k in state) else "official"


def read_weights(path: str | os.PathLike, fmt: str = "auto", heads: int | None = None,
                 **config_overrides: Any) -> tuple[ModelConfig, StateDict]:
    """(config, state dict in our layout) from released weights of any format `weights_format` tells. `heads`: the
    head count of weights that do not record it (the original's .pt, multimolecule weights without their
    directory's config.json), unless overridden; `config_overrides` win over what a file records."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"fmt {fmt!r}: one of {', '.join(WEIGHT_FORMATS)}")
    path = Path(path)
    named = path if path.is_file() else None   # the weights file given, read as it is
    if fmt in ("auto", "rnalm", "multimolecule") and path.name in (WEIGHTS_NAME, "pytorch_model.bin") \
            and path.is_file() and (path.parent / CONFIG_NAME).is_file():
        path = path.parent  # the weights of a directory whose config.json records their settings (heads, ...)
    source: str | os.PathLike | StateDict = path
    if fmt == "auto" and path.is_file():  # read once: its keys tell the layout (a giga .pt is 2.6 GB)
        source = read_state_dict(path)
        fmt = _file_format(source)
    fmt = weights_format(path) if fmt == "auto" else fmt
    if fmt == "rnalm":
        return read_pretrained(path, **config_overrides)
    recorded: dict[str, Any] = {}
    if fmt == "multimolecule" and path.is_dir():
        source = named or next(p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists())
        recorded = multimolecule_settings(path)
    importer = import_official if fmt == "official" else import_multimolecule
    unrecorded = {"num_heads": heads} if heads is not None else {}
    return importer(source, where=str(path), **{**unrecorded, **recorded, **config_overrides})


# --- the original RiNALMo layout -------------------------------------------------------------------

def read_state_dict(path_or_state: str | os.PathLike | Mapping[str, torch.Tensor]) -> StateDict:
    """A state dict from `.safetensors`, or from `.pt` with `torch.load(weights_only=True)` (no pickled code)."""
    if isinstance(path_or_state, Mapping):
        return dict(path_or_state)
    path = Path(path_or_state)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the unpickler fails any way on other data (KeyError on a text file)
        raise WeightsError(f"{path}: torch.load(weights_only=True) cannot read a state dict from it (a damaged "
                           f"file, another format, or pickled objects besides tensors): {_reason(e)}") from None
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def _reason(e: Exception) -> str:
    """The telling part of a torch.load error (its weights_only message wraps it in paragraphs of advice)."""
    text = " ".join(str(e).split())
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Please use")[0].split(" Check the documentation")[0]
    return text.strip()[:300] or type(e).__name__


def block_count(state: Mapping[str, Any], prefix: str) -> int:
    """1 + the highest block index i of the keys `prefix` + "i." (0 without any)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)


def infer_config(state: Mapping[str, torch.Tensor], where: str, **overrides: Any) -> ModelConfig:
    """Model size from tensor shapes (all original sizes use 20 heads)."""
    if "embedding.weight" not in state:
        raise WeightsError(f"{where}: no embedding.weight; is this a RiNALMo state dict?")
    dim = state["embedding.weight"].shape[1]
    layers = block_count(state, "transformer.blocks.")
    name = next((n for n, (d, nl) in PRESETS.items() if (d, nl) == (dim, layers)),
                "custom")
    try:
        cfg = ModelConfig(**{"name": name, "dim": dim, "num_layers": layers, **overrides})
    except ValueError as e:
        hint = ("; the file records no head count (20 in every original size): pass num_heads, e.g. "
                "import_official(path, num_heads=4)" if "num_heads" in str(e) and "num_heads" not in overrides else "")
        raise WeightsError(f"{where}: {e}{hint}") from None
    if name != "custom" and cfg.num_heads != ModelConfig.num_heads and "name" not in overrides:
        cfg = replace(cfg, name=f"{name}-custom")  # as ModelConfig.preset labels a resized preset
    return cfg


def import_official(path_or_state, *, where: str | None = None,
                    **config_overrides: Any) -> tuple[ModelConfig, StateDict]:
    """The original's `*_pretrained.pt` (or a fine-tuned wrapper with prefix `lm.`/`rinalmo.`)."""
    where = where or (str(path_or_state) if not isinstance(path_or_state, Mapping) else "official state dict")
    state = read_state_dict(path_or_state)
    for prefix in ("lm.", "rinalmo."):
        if any(k.startswith(prefix + "embedding.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if "inv_freq" not in k}
    cfg = infer_config(state, where, **config_overrides)
    check_state_dict(state, cfg, where)
    return cfg, state


def export_official(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state dict the original code loads with `load_state_dict(torch.load(path))`. Tensors only: a .pt
    records no settings, and its readers take the original's (20 heads, RoPE base 10000, ...), so a model with
    others computes otherwise when read back unless the reader is told (import_official(path, num_heads=4));
    `python -m rnalm.export` refuses such a model."""
    atomic_write(Path(path), lambda p: torch.save({k: v.detach().cpu() for k, v in state.items()}, p),
                 durable=True)


# --- the multimolecule layout ----------------------------------------------------------------------

_MM_BLOCK = {
    "attn_layer_norm.weight": "attention.layer_norm.weight",
    "attn_layer_norm.bias": "attention.layer_norm.bias",
    "mh_attn.out_proj.weight": "attention.output.dense.weight",
    "out_layer_norm.weight": "layer_norm.weight",
    "out_layer_norm.bias": "layer_norm.bias",
    "transition.0.linear.weight": "intermediate.linear.weight",
    "transition.0.linear.bias": "intermediate.linear.bias",
    "transition.0.linear_gate.weight": "intermediate.linear_gate.weight",
    "transition.0.linear_gate.bias": "intermediate.linear_gate.bias",
    "transition.0.beta": "intermediate.bias",
    "transition.2.weight": "output.dense.weight",
    "transition.2.bias": "output.dense.bias",
}
_MM_TOP = {
    "transformer.final_layer_norm.weight": "model.encoder.layer_norm.weight",
    "transformer.final_layer_norm.bias": "model.encoder.layer_norm.bias",
    "lm_mask_head.linear1.weight": "lm_head.transform.dense.weight",
    "lm_mask_head.linear1.bias": "lm_head.transform.dense.bias",
    "lm_mask_head.layer_norm.weight": "lm_head.transform.layer_norm.weight",
    "lm_mask_head.layer_norm.bias": "lm_head.transform.layer_norm.bias",
}
_MM_QKV = ("query", "key", "value")
# ModelConfig settings a multimolecule RiNALMoConfig records (config.json), by its field names
MULTIMOLECULE_SETTINGS = {"dim": "hidden_size", "num_layers": "num_hidden_layers",  # checked against the tensors
                          "num_heads": "num_attention_heads", "residual_dropout": "hidden_dropout",
                          "attn_dropout": "attention_dropout", "layer_norm_eps": "layer_norm_eps",
                          "token_dropout": "token_dropout"}


def multimolecule_settings(folder: Path) -> dict[str, Any]:
    """The ModelConfig settings a multimolecule directory's config.json records (none without one)."""
    config = folder / CONFIG_NAME
    if not config.is_file():
        return {}
    recorded = read_json(config)
    settings = {ours: recorded[theirs] for ours, theirs in MULTIMOLECULE_SETTINGS.items() if theirs in recorded}
    if settings.get("layer_norm_eps") == 1e-12:  # their early configs' value; RiNALMo's weights were trained at 1e-5
        warnings.warn(f"{config}: layer_norm_eps 1e-12 read as RiNALMo's 1e-5 (an early multimolecule config value)",
                      stacklevel=2)
        settings["layer_norm_eps"] = 1e-5
    return settings


def _mm_rows(mm_vocab: tuple[str, ...]) -> list[int]:
    """For each of our token ids, the row of the same token in the multimolecule vocabulary."""
    missing = [t for t in VOCAB if _OURS_TO_MM_TOKEN[t] not in mm_vocab]
    if missing:
        raise WeightsError(f"multimolecule vocabulary lacks tokens {missing}")
    return [mm_vocab.index(_OURS_TO_MM_TOKEN[t]) for t in VOCAB]


def import_multimolecule(path_or_state, mm_vocab: tuple[str, ...] | None = None, *, where: str | None = None,
                         **config_overrides: Any) -> tuple[ModelConfig, StateDict]:
    """multimolecule `RiNALMoForMaskedLM` weights -> our (the original's) names and vocabulary order. The
    vocabulary is told by the embedding's row count (26: published checkpoints, 28: current releases) unless
    given; rows are re-indexed by token, so a vocabulary that does not match the weights is an error."""
    where = where or (str(path_or_state) if not isinstance(path_or_state, Mapping) else "multimolecule state dict")
    mm = read_state_dict(path_or_state)
    try:
        vocab_rows = mm["model.embeddings.word_embeddings.weight"].shape[0]
        if mm_vocab is None and vocab_rows not in MULTIMOLECULE_VOCABS:
            raise WeightsError(f"{where}: {vocab_rows} embedding rows, but the known multimolecule vocabularies "
                               f"have {sorted(MULTIMOLECULE_VOCABS)} tokens: pass mm_vocab")
        mm_vocab = mm_vocab or MULTIMOLECULE_VOCABS[vocab_rows]
        for name in ("model.embeddings.word_embeddings.weight", "lm_head.decoder.weight"):
            if mm[name].shape[0] != len(mm_vocab):
                raise WeightsError(f"{where}: {name} has {mm[name].shape[0]} rows for a vocabulary of "
                                   f"{len(mm_vocab)} tokens")
        rows = torch.tensor(_mm_rows(mm_vocab))
        state: StateDict = {"embedding.weight": mm["model.embeddings.word_embeddings.weight"][rows]}
        layers = block_count(mm, "model.encoder.layer.")
        for i in range(layers):
            src = f"model.encoder.layer.{i}."
            for ours, theirs in _MM_BLOCK.items():
                state[f"transformer.blocks.{i}.{ours}"] = mm[src + theirs]
            state[f"transformer.blocks.{i}.mh_attn.Wqkv.weight"] = torch.cat(
                [mm[f"{src}attention.self.{n}.weight"] for n in _MM_QKV], dim=0)
        for ours, theirs in _MM_TOP.items():
            state[ours] = mm[theirs]
        state["lm_mask_head.linear2.weight"] = mm["lm_head.decoder.weight"][rows]
        bias = mm.get("lm_head.bias", mm.get("lm_head.decoder.bias"))
        if bias is None:
            raise KeyError("lm_head.bias")
        state["lm_mask_head.linear2.bias"] = bias[rows]
    except KeyError as err:
        raise WeightsError(f"{where}: missing multimolecule tensor {err.args[0]}") from None
    unknown = sorted(set(mm) - set(export_multimolecule(state, mm_vocab))
                     - {k for k in mm if _MM_NOT_THE_BACKBONE.search(k)})
    if unknown:  # dropped, the model would compute something else than the file
        raise WeightsError(f"{where}: multimolecule tensors this import does not know: {', '.join(unknown[:6])}"
                           + (f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else ""))
    cfg = infer_config(state, where, **config_overrides)
    check_state_dict(state, cfg, where)
    return cfg, state


# tensors of a multimolecule file that a backbone import leaves out on purpose: other heads, rotary buffers
_MM_NOT_THE_BACKBONE = re.compile(r"^ss_head\.|(^|\.)pooler\.|inv_freq$|position_ids$")


def export_multimolecule(state: Mapping[str, torch.Tensor],
                         mm_vocab: tuple[str, ...] = MULTIMOLECULE_VOCAB) -> StateDict:
    """Our state dict -> multimolecule names and vocabulary. The letters RiNALMo lacks (X . * | ?), which its
    tokenizer and ours read as <unk>, get copies of the <unk> row, so that the exported model gives our outputs
    on any sequence (multimolecule's converter gives X the mean of A, C, G, U, the others zeros); its special
    tokens RiNALMo lacks (<null>) get zero rows."""
    rows = torch.tensor(_mm_rows(mm_vocab))
    unknown = [i for i, tok in enumerate(mm_vocab) if len(tok) == 1 and tok not in _OURS_TO_MM_TOKEN.values()]

    def reindex(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((len(mm_vocab), *t.shape[1:]))
        out[rows] = t
        out[unknown] = t[UNK_ID]
        return out

    mm: StateDict = {"model.embeddings.word_embeddings.weight": reindex(state["embedding.weight"])}
    layers = block_count(state, "transformer.blocks.")
    for i in range(layers):
        dst = f"model.encoder.layer.{i}."
        for ours, theirs in _MM_BLOCK.items():
            mm[dst + theirs] = state[f"transformer.blocks.{i}.{ours}"]
        for name, part in zip(_MM_QKV, state[f"transformer.blocks.{i}.mh_attn.Wqkv.weight"].chunk(3, dim=0)):
            mm[f"{dst}attention.self.{name}.weight"] = part
    for ours, theirs in _MM_TOP.items():
        mm[theirs] = state[ours]
    mm["lm_head.decoder.weight"] = reindex(state["lm_mask_head.linear2.weight"])
    # their model ties lm_head.bias to lm_head.decoder.bias; both names, as their converter writes (a copy, so that
    # safetensors, which refuses shared tensors, can save the dict)
    mm["lm_head.bias"] = reindex(state["lm_mask_head.linear2.bias"])
    mm["lm_head.decoder.bias"] = mm["lm_head.bias"].clone()
    return mm
