"""The trainer's validation, offline, for any released weights: masked-LM loss, perplexity and accuracy on a shard
set's held-out split, with the run's crops and masks (they are keyed by record, so every model sees the same).

    python -m pretrain.evaluate WEIGHTS --config RUN/config.yaml [--section.key=value ...]
        [--device auto|cpu|cuda] [--dtype float32|bfloat16]

WEIGHTS: a `pretrain.convert` directory, the original's `.pt` or multimolecule weights (rnalm.io.read_weights;
the head count of a .pt or a bare multimolecule file, which do not record it, is the config's). --config is
required: the run's config.yaml, or pretrain/configs/<preset>.yaml with --data.shards=DIR. One process, no
DeepSpeed, CPU or one GPU.
The trainer validates the held-out split's first `train.valid_max_records` records at any world size, so the
run's config gives its logged number (a converted checkpoint must reproduce it); `--train.valid_max_records=0`
scores the whole split. Compare models on one config: the released RiNALMo and a continued pretraining, say.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from typing import Any

import torch

from dataprep.shards import ShardError, shard_set_digest
from pretrain.config import PretrainConfig
from pretrain.data import PretrainLoader
from pretrain.train import masked_index, mlm_sums, validation_summary
from rnalm import io as rio
from rnalm.configfile import from_cli
from rnalm.model import RiNALMo


@torch.no_grad()
def validation(model: RiNALMo, cfg: PretrainConfig) -> dict[str, Any]:
    """The trainer's validation: the held-out split's first valid_max_records records (0: all), whatever the
    run's world size (ranks share those records; crops and masks are keyed by record)."""
    device = next(model.parameters()).device
    sums = [0.0, 0.0, 0, 0]  # ce, correct, masked, records
    data = replace(cfg.valid_data(), pin_memory=device.type == "cuda")  # --device=cpu on a GPU host: no pinning
    loader = PretrainLoader(data)
    for batch in loader:
        batch = batch.to(device)
        index = masked_index(batch)
        ce, correct = mlm_sums(model.forward_packed(batch, logits_index=index).logits, batch.targets[index])
        for k, v in enumerate((ce.item(), correct.item(), index.numel(), batch.num_sequences)):
            sums[k] += v
    if not sums[2]:
        raise ValueError(f"{cfg.data.shards}: no masked token in the '{cfg.train.valid_split}' split")
    return {**validation_summary(*sums), "corrupt_shards_skipped": loader.stats["corrupt_shards_skipped"]}


def load_weights(path: str, cfg: PretrainConfig, device: torch.device, dtype: torch.dtype) -> RiNALMo:
    mcfg, state = rio.read_weights(path, heads=cfg.model.num_heads)
    return rio.with_weights(lambda: RiNALMo(mcfg), state, device).to(dtype).eval()  # no CPU copy of the model


def other_shards_note(weights: str, shards: str) -> str | None:
    """A warning when `weights` (a pretrain.convert directory) come from a run on another shard set than `shards`,
    e.g. one rebuilt in the same folder with another --valid-fraction: its held-out split may then hold records
    the model trained on."""
    try:
        trained_on = rio.read_json(os.path.join(weights, rio.CONFIG_NAME)).get("provenance", {}).get("shards_manifest")
    except rio.WeightsError:  # (read_json's error for a missing or unreadable file too)
        return None  # a .pt or another format: no record of its data
    now = shard_set_digest(shards)
    if trained_on is None or trained_on == now:
        return None
    return (f"warning: {shards} is not the shard set this model's run trained on (manifest sha256 {now[:12]}, the "
            f"run's {trained_on[:12]}): if it was rebuilt since, its held-out split may hold records the model "
            "trained on")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    parser.add_argument("weights")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        from_cli(PretrainConfig, ["--help"], prog="python -m pretrain.evaluate WEIGHTS --config RUN/config.yaml")
    args, rest = parser.parse_known_args(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        parser.error("--config is required: a run's config.yaml (its shards, crops and masks), or "
                     "pretrain/configs/<preset>.yaml with --data.shards=DIR")
    cfg = from_cli(PretrainConfig, rest, prog="python -m pretrain.evaluate WEIGHTS")
    if not cfg.data.shards:
        parser.error("data.shards is not set (the preset configs leave it empty): pass --data.shards=DIR, a "
                     "dataprep output")
    if not os.path.isabs(cfg.data.shards) and not os.path.exists(cfg.data.shards):
        parser.error(f"data.shards={cfg.data.shards} (a relative path, as the config records it) is not found from "
                     f"{os.getcwd()}: run from the directory the run was started in, or pass --data.shards=PATH")
    try:
        cfg.validate_data()
        device = rio.check_device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                  "cpu" if args.device == "auto" else args.device)
        model = load_weights(args.weights, cfg, device, getattr(torch, args.dtype))
        t0 = time.perf_counter()
        result = validation(model, cfg)
        if note := other_shards_note(args.weights, cfg.data.shards):
            print(note, file=sys.stderr)
        if not math.isfinite(result["loss"]):
            raise ValueError(f"{args.weights}: the loss is {result['loss']} (weights with NaN or infinite values?)")
    except (OSError, ValueError, ShardError) as e:  # (a WeightsError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(weights=args.weights, shards=cfg.data.shards, split=cfg.train.valid_split,
                  valid_max_records=cfg.train.valid_max_records, dtype=args.dtype,
                  seconds=round(time.perf_counter() - t0, 3))
    print(f"{args.weights}: loss {result['loss']:.4f} | ppl {result['perplexity']:.3f} | acc {result['accuracy']:.3%} "
          f"| {result['masked_tokens']:,} masked tokens in {result['records']:,} records", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
