"""Released weights (`model.safetensors` + `config.json`) -> the layouts other RiNALMo code loads.

    python -m rnalm.export MODEL_DIR --to official rinalmo_giga_pretrained.pt   # the original code:
        # model.load_state_dict(torch.load(...)), e.g. in its fine-tuning scripts
    python -m rnalm.export MODEL_DIR --to multimolecule hf_model/               # Hugging Face, multimolecule:
        # RiNALMoForMaskedLM.from_pretrained("hf_model"), with multimolecule's RnaTokenizer

The multimolecule directory holds `model.safetensors` (its names, its current 28-token vocabulary) and a
`config.json` of its RiNALMoConfig fields; everything else is left to that class's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from rnalm.config import ModelConfig
from rnalm.files import atomic_write_all, check_out_dir
from rnalm.io import (MULTIMOLECULE_SETTINGS, MULTIMOLECULE_VOCAB_28, WEIGHTS_NAME, CONFIG_NAME, WeightsError,
                      export_multimolecule, export_official, read_pretrained)

# ModelConfig fields each target cannot express, of those that change what the model computes (a .pt records no
# settings: readers take the original's 20 heads of every size, its code's RoPE base, token dropout and LayerNorm
# eps; multimolecule's config has no field for these): a model that differs from RiNALMo's there is refused
FIXED_IN = {"official": ("num_heads", "rope_base", "token_dropout", "mask_ratio_train", "layer_norm_eps"),
            "multimolecule": ("vocab_size", "mask_ratio_train", "rope_base")}
# Dropouts each target cannot carry: they act in training only (the weights compute the same), so a model whose
# dropouts differ from RiNALMo's is exported with a warning that the target reads RiNALMo's back
DROPOUTS_LOST_IN = {"official": ("attn_dropout", "residual_dropout", "transition_dropout"),
                    "multimolecule": ("transition_dropout",)}


def inexpressible(cfg: ModelConfig, to: str, settings: dict[str, tuple[str, ...]] = FIXED_IN) -> list[str]:
    """The settings of `cfg` that target `to` cannot express (they differ from RiNALMo's)."""
    default = {f.name: f.default for f in fields(ModelConfig)}
    return [k for k in settings[to] if getattr(cfg, k) != default[k]]


def check_expressible(cfg: ModelConfig, to: str) -> None:
    differs = inexpressible(cfg, to)
    if differs:
        other = next(t for t in FIXED_IN if t != to)
        raise WeightsError(f"{to} RiNALMo has no setting for {differs} (this model: "
                           f"{', '.join(f'{k} {getattr(cfg, k)}' for k in differs)}): it would compute otherwise"
                           + ("" if inexpressible(cfg, other) else f"; --to {other} can describe this model"))


def multimolecule_config(cfg: ModelConfig) -> dict[str, Any]:
    """multimolecule RiNALMoConfig fields of our model (its SwiGLU width is int(2/3 x intermediate_size))."""
    return {"architectures": ["RiNALMoForMaskedLM"], "model_type": "rinalmo",
            "vocab_size": len(MULTIMOLECULE_VOCAB_28), "hidden_size": cfg.dim, "num_hidden_layers": cfg.num_layers,
            "intermediate_size": 4 * cfg.dim, "pad_token_id": MULTIMOLECULE_VOCAB_28.index("<pad>"),
            **{theirs: getattr(cfg, ours) for ours, theirs in MULTIMOLECULE_SETTINGS.items()}}


def export(model_dir: str | os.PathLike, to: str, out: str | os.PathLike) -> Path:
    if not str(out):
        raise ValueError("OUT is required: the .pt file (official) or directory (multimolecule) to write")
    out = Path(out)
    if to == "official" and out.is_dir():
        raise WeightsError(f"{out} is a directory: --to official writes one .pt file")
    if to == "multimolecule" and out.exists() and not out.is_dir():
        raise WeightsError(f"{out} is a file: --to multimolecule writes a directory")
    check_out_dir(out.parent if to == "official" else out, "OUT")  # not under a file, writable
    if Path(model_dir).resolve() in (out.resolve(), out.resolve().parent):
        raise WeightsError(f"{out} is {'in ' * (to == 'official')}the model directory itself: its files would be "
                           "replaced (and its provenance lost); write it elsewhere")
    if to == "multimolecule" and _is_ours(out):
        raise WeightsError(f"{out} holds a model of this tool ({CONFIG_NAME} with a format_version): multimolecule's "
                           "files would replace it; write it elsewhere")
    cfg, state = read_pretrained(model_dir)
    check_expressible(cfg, to)
    if lost := inexpressible(cfg, to, DROPOUTS_LOST_IN):
        print(f"warning: {to} RiNALMo records no {', '.join(lost)}: read back, this model's "
              f"{', '.join(f'{k} {getattr(cfg, k)}' for k in lost)} become RiNALMo's defaults (dropout acts in "
              "training only; the weights are exact)", file=sys.stderr)
    if to == "official":
        out.parent.mkdir(parents=True, exist_ok=True)
        export_official(state, out)
        return out
    config = multimolecule_config(cfg)
    tensors = {k: v.contiguous() for k, v in export_multimolecule(state, MULTIMOLECULE_VOCAB_28).items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_all([(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                      (out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")], durable=True)
    return out


def _is_ours(directory: Path) -> bool:
    try:
        return "format_version" in json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError, TypeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rnalm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="model.safetensors + config.json (pretrain.convert's output)")
    parser.add_argument("--to", required=True, choices=["official", "multimolecule"])
    parser.add_argument("out", help="official: the .pt file to write; multimolecule: a directory")
    args = parser.parse_args(argv)
    try:
        print(f"{args.to} weights: {export(args.model_dir, args.to, args.out)}")
    except (OSError, ValueError) as e:
        parser.exit(1, f"python -m rnalm.export: error: {e}\n")


if __name__ == "__main__":
    main()
