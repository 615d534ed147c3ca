"""The fine-tuning loop shared by all tasks: optimizer groups from the unfreezing plan, linear lr decay,
optional bf16 autocast on GPU, validation each epoch, best checkpoint kept (atomic writes)."""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from finetune.backbone import TaskModel, remove_finetuned
from finetune.unfreeze import Unfreezer, UnfreezeConfig

T = TypeVar("T")


@dataclass
class TrainConfig:
    out_dir: str = "finetune_out"
    epochs: int = 10
    batch_size: int = 1
    eval_batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    lr_end_factor: float = 0.1          # lr falls linearly to lr * this over lr_decay_steps, then stays
    lr_decay_steps: int = 5000
    grad_clip: float | None = None
    max_steps_per_epoch: int | None = None  # cap for quick runs
    max_seconds: float | None = None     # wall-clock budget of fit (validations count): the step past it ends training
    seed: int = 0
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on CUDA (the original fine-tuned in bf16/16-mixed), fp32 elsewhere; bf16: the same, with a
    # warning off CUDA; fp32: fp32 everywhere
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    progress: bool = True                # progress bars when stderr is a terminal (never in a log file)


def progress_bar(items: Iterable[T], desc: str, progress: bool) -> Iterable[T]:
    """tqdm's bar over items when progress is on and stderr is a terminal: a redirected run's log gets no bar."""
    return tqdm(items, desc=desc, disable=None if progress else True, leave=False)


def pick_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N; a device this machine lacks is a ValueError (the CLI's one-line error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_train_config(cfg: TrainConfig) -> torch.device:
    """The checks that need neither data nor model (the CLI makes them before it clears OUT); the device."""
    for name in ("epochs", "batch_size", "eval_batch_size", "max_steps_per_epoch", "lr_decay_steps"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"train.{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "grad_clip"):  # a negative grad_clip flipped every gradient's sign
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise ValueError(f"train.{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("weight_decay", "lr_end_factor", "max_seconds"):  # max_seconds 0: one step, then validation
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0:
            raise ValueError(f"train.{name} must be >= 0, got {getattr(cfg, name)}")
    return pick_device(cfg.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocasts(device: torch.device, precision: str) -> bool:
    """Whether training steps run under bf16 autocast (TrainConfig.precision)."""
    return precision != "fp32" and device.type == "cuda"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocasts(device, precision))


def fit(model: TaskModel, cfg: TrainConfig, unfreeze: UnfreezeConfig,
        batches: Callable[[int], Iterable[Any]], loss_fn: Callable[[TaskModel, Any], torch.Tensor],
        validate: Callable[[TaskModel], dict[str, Any]], save: Callable[[TaskModel, dict[str, Any]], None],
        score_key: str, higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Train for cfg.epochs; after each epoch validate, and `save` when `score_key` improved (a NaN score never
    does). An epoch that leaves non-finite weights is not validated (its score is NaN) and ends training. Raises
    when no epoch was saved, so a caller never goes on with an older run's model in OUT.

    `batches(epoch)` yields the epoch's training batches; `loss_fn(model, batch)` returns a scalar loss.
    Returns the per-epoch history (also written to OUT/log.jsonl, which each run starts anew).
    """
    device = check_train_config(cfg)
    if cfg.precision == "bf16" and device.type != "cuda":
        warnings.warn(f"train.precision=bf16 autocasts on CUDA only: this run on {device.type} trains in fp32",
                      stacklevel=2)
    model.to(device)
    unfreezer = Unfreezer(model.lm, unfreeze, model.lm.config.num_layers)
    groups = [{"params": list(model.pred_head.parameters()), "lr": cfg.lr, "base_lr": cfg.lr}]
    opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    log_path = Path(cfg.out_dir) / "log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    remove_finetuned(cfg.out_dir)
    best, history, step = -math.inf if higher_is_better else math.inf, [], 0
    started = time.time()

    def out_of_time() -> bool:
        return cfg.max_seconds is not None and time.time() - started > cfg.max_seconds

    for epoch in range(cfg.epochs):
        if epoch > 0 and out_of_time():
            break
        new = unfreezer.step(epoch)
        if new:
            lr = cfg.lr * unfreezer.lr_scale(epoch)
            opt.add_param_group({"params": new, "lr": lr, "base_lr": lr})
        t0 = time.time()
        losses, step = train_epoch(model, opt, batches(epoch), loss_fn, cfg, device, step, epoch, out_of_time)
        diverged, val = validate_epoch(model, validate, score_key)
        score = math.nan if val[score_key] is None else val[score_key]  # None: undefined (e.g. R^2 of 1 record)
        improved = score > best if higher_is_better else score < best
        record = {"epoch": epoch, "steps": step, "train_loss": _number(np.mean(losses)) if losses else None,
                  "trainable_lm_params": sum(p.numel() for p in model.lm.parameters() if p.requires_grad),
                  "seconds": round(time.time() - t0, 2), **{f"valid_{k}": _number(v) for k, v in val.items()},
                  "diverged": diverged, "best": bool(improved)}
        history.append(record)
        with open(log_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        if cfg.progress:
            tqdm.write(json.dumps(record, default=str))
        if improved:
            best = score
            save(model, val)
        if diverged:  # NaN/inf weights (and Adam state) stay so: no later epoch can recover
            break
    if not any(r["best"] for r in history):
        why = (f"non-finite weights after epoch {history[-1]['epoch']} (train loss {history[-1]['train_loss']}): "
               "lower train.lr" if history[-1]["diverged"] else "is the validation split big enough?")
        raise ValueError(f"no model saved in {cfg.out_dir}: the validation {score_key} was never a number "
                         f"({[r[f'valid_{score_key}'] for r in history]}); {why}")
    return history


def _number(value: Any) -> Any:
    """A float as log.jsonl and results.json can hold it: NaN and inf are not JSON (null instead)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def train_epoch(model: TaskModel, opt: torch.optim.Optimizer, batches: Iterable[Any],
                loss_fn: Callable[[TaskModel, Any], torch.Tensor], cfg: TrainConfig, device: torch.device,
                step: int, epoch: int, out_of_time: Callable[[], bool]) -> tuple[list[float], int]:
    """One epoch of optimizer steps with the linear lr decay; returns its losses and the global step after it."""
    model.train()
    losses: list[float] = []
    it = progress_bar(batches, f"epoch {epoch}", cfg.progress)
    for k, batch in enumerate(it):
        if (cfg.max_steps_per_epoch is not None and k >= cfg.max_steps_per_epoch) or (step and out_of_time()):
            break  # a budget cut mid-epoch: that part-epoch is still validated (and kept when best)
        factor = 1.0 + (cfg.lr_end_factor - 1.0) * min(step / max(cfg.lr_decay_steps, 1), 1.0)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        with autocast(device, cfg.precision):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        it.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses, step


def validate_epoch(model: TaskModel, validate: Callable[[TaskModel], dict[str, Any]],
                   score_key: str) -> tuple[bool, dict[str, Any]]:
    """(diverged, validation metrics); a model with non-finite weights is not validated: its score is NaN (the
    validations would score it as a number: no pairs, one class). In fp32 whatever train.precision is, as the test
    pass and `evaluate`: the kept epoch and the SS threshold are chosen on the numbers they later reproduce."""
    model.eval()
    if not weights_finite(model):
        return True, {score_key: math.nan}
    with torch.no_grad():
        return False, validate(model)


def weights_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
