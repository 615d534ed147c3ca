"""Pretraining entry point: `python -m pretrain.train --config pretrain/configs/<name>.yaml [--section.key=value]`.

DeepSpeed (ZeRO-3 by default) over packed MLM batches from pretrain.data. Per optimizer step every rank
takes `train.grad_accum` packed micro-batches; see docs/pretrain.md for the loss normalisation, the
non-finite policy, checkpoints, signals, metrics and the log format.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dataprep.shards import ShardError, read_manifest, shard_set_digest
from pretrain.buildlocks import StaleBuildLockWatch
from pretrain.checkpoint import (UNIVERSAL_SUFFIX, CheckpointError, Checkpointer, CheckpointSaveError, check_archives,
                                 check_files, complete_tags, latest_tag, read_trainer_state, tag_for)
from pretrain.config import OptimConfig, PretrainConfig, deepspeed_config
from pretrain.convert import to_universal
from pretrain.data import PretrainLoader
from pretrain.data.packing import pad_to_tokens
from pretrain.metrics import TrainMetrics, device_memory
from pretrain.mfu import FlopCounter, device_name, mfu, peak_flops_of
from pretrain.profiling import PhaseClock, StepProfiler
from rnalm.runlock import RunLock, RunLockError
from pretrain.schedule import build_scheduler, set_schedule
from rnalm import io as rio
from rnalm.attention import WITHOUT_DROPOUT, resolve_backend
from rnalm.batch import IGNORE_INDEX, PackedBatch
from rnalm.config import MACHINE_CHOICES, ModelConfig
from rnalm.configfile import changed_settings, from_cli, save_yaml, to_dict
from rnalm.model import RiNALMo, TransformerBlock
from rnalm.tokenizer import CLS_ID, EOS_ID, STANDARD_NUCLEOTIDE_IDS

EXIT_NONFINITE = 3
EXIT_DATA = 4
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
COMPILED_PARTS = 2  # TransformerBlock.pre_attention and post_attention (forward graphs; backward ones not counted)


class RefusedStart(RuntimeError):
    """A start-up this run cannot make as configured (exit 2, one line), e.g. unusable train.init_weights or a
    metrics port in use; refused checkpoints are CheckpointError."""


class PretrainModel(RiNALMo):
    """RiNALMo whose forward is the packed MLM forward, so the DeepSpeed engine (and its ZeRO-3 hooks) runs it.

    Same parameter names as RiNALMo, so checkpoints convert to released weights unchanged.
    """

    def forward(self, tokens, cu_seqlens, positions, max_seqlen: int, logits_index):  # type: ignore[override]
        batch = PackedBatch(tokens=tokens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, positions=positions)
        return self.forward_packed(batch, logits_index=logits_index).logits


def masked_index(batch: PackedBatch) -> torch.Tensor:
    return (batch.targets != IGNORE_INDEX).nonzero().squeeze(1)


def mlm_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, correct predictions) over the masked rows, in fp32."""
    logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum"), (logits.argmax(-1) == targets).sum()


def validation_summary(ce: float, correct: float, masked: float, records: float) -> dict[str, Any]:
    """A validation's numbers (its `valid` event in log.jsonl) from the summed counts."""
    loss = ce / masked
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": correct / masked,
            "masked_tokens": int(masked), "records": int(records)}


# settings that change what the weights compute but not their shapes: released weights must have the run's
INIT_WEIGHTS_SAME = ("num_heads", "rope_base")


def read_init_weights(path: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """train.init_weights as a state dict for `model_cfg`: same shapes, same INIT_WEIGHTS_SAME settings. A
    pretrain.convert directory records its head count, as does a multimolecule directory's config.json; the
    original's .pt and bare multimolecule weight files do not (their models are RoPE base 10000), so for them the
    model section's head count is taken."""
    saved, state = rio.read_weights(path, heads=model_cfg.num_heads)
    rio.check_state_dict(state, model_cfg, path)
    differs = {k: (getattr(saved, k), getattr(model_cfg, k)) for k in INIT_WEIGHTS_SAME
               if getattr(saved, k) != getattr(model_cfg, k)}
    if differs:
        raise rio.WeightsError(f"{path} was trained with other settings than the model section's (theirs, "
                               f"this run's): {differs}")
    return state


FROM_ITS_WEIGHTS = ("start another train.out_dir from its weights (python -m pretrain.convert, then "
                    "--train.init_weights)")
# what a resumed run takes from its own config, not from the checkpoint's optimizer (the LR: set_schedule)
OPTIM_HYPERPARAMETERS = ("weight_decay", "betas", "eps")

# model settings a resume may change: how the same weights are computed (kernel, recomputation, GEMM padding)
# and the dropout rates (token dropout's mask ratio follows data.mask_prob, which may change too); any other
# difference is another model (shapes, heads, RoPE base, vocabulary, ...)
RESUME_MAY_CHANGE = (*MACHINE_CHOICES, "name", "attn_dropout", "residual_dropout", "transition_dropout",
                     "mask_ratio_train")


def model_changes(saved: dict, model_cfg: ModelConfig) -> dict[str, tuple]:
    """{key: (a checkpoint's model setting, this run's)} for the settings a resume may not change."""
    now = model_cfg.to_dict()
    return {k: (v, now.get(k)) for k, v in saved.items() if k not in RESUME_MAY_CHANGE and now.get(k) != v}


def samples_digest(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()


def dummy_batch() -> PackedBatch:
    """One 3-token sequence without targets: keeps a rank in step with ZeRO-3's collectives when its data ran out,
    and gives a dropped micro-batch's boundary its backward."""
    seq = torch.tensor([CLS_ID, STANDARD_NUCLEOTIDE_IDS[0], EOS_ID])
    return PackedBatch.from_sequences([seq], targets=[torch.full((3,), IGNORE_INDEX)])


@dataclass
class StepResult:
    stepped: bool          # an optimizer step happened
    nonfinite: int         # micro-batches dropped for a NaN/inf loss (on any rank)
    loss: float
    tokens: int            # global
    samples: int           # global
    masked: int            # global
    flops: float           # global
    stop: bool             # some rank asked to stop (signal)
    ids_digest: str
    local_tokens: int
    local_samples: int
    local_flops: float
    corrupt_shards: int    # distinct shards skipped as corrupt so far, over all ranks
    phase_seconds: dict[str, float]  # this rank's forward / backward / optimizer time (pretrain.profiling.PhaseClock)


class Trainer:
    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.train.out_dir)
        self.model_cfg = cfg.model_config()
        _default_distributed_env()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # The endpoint first, before the slow parts of the start-up (the rendezvous of all ranks, a universal
        # conversion, the model build under zero.Init, deepspeed.initialize, the resume): its file_sd target exists
        # from the job's start, and a rank not answering for 2 minutes pages (RnalmRankDown), so a node slow to start
        # shows as its own ranks down, not as every rank of the job; the stall alert counts start-up from here.
        self.metrics = TrainMetrics(run_id=cfg.metrics.run_id or self.out.resolve().name, model=self.model_cfg.name,
                                    world_size=int(os.environ.get("WORLD_SIZE", 1)),
                                    slurm_job_id=os.environ.get("SLURM_JOB_ID", ""))
        self.metrics_port = None
        if cfg.metrics.enabled:
            self.metrics_port = self._serve_metrics()
        build_locks = StaleBuildLockWatch().start()  # DeepSpeed builds ops from here to deepspeed.initialize
        import deepspeed  # heavy import; keep `--help` fast

        deepspeed.init_distributed(auto_mpi_discovery=False)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = _device(self.local_rank)
        self.bf16 = _use_bf16(cfg, self.device)
        self.flops = FlopCounter(self.model_cfg)
        self.peak_flops = cfg.metrics.peak_flops or peak_flops_of(device_name())
        self.log = _JsonLog(self.out / "log.jsonl") if self.rank == 0 else None
        self.stop_requested = False
        for sig in STOP_SIGNALS:  # before the slow rest of the start-up: a signal there stops at the first step
            signal.signal(sig, self._on_signal)
        self.step = self.tokens = self.samples = self.nonfinite_steps = 0
        self.attempts = self.nonfinite_in_row = 0
        self.last_valid = -1
        self.validated = False  # in this process (compiled parts then have eval graphs too)

        self.profiler = StepProfiler(cfg.train.profile_at if self.rank == 0 else 0, self.out / "profile", self.device)
        self.clock = PhaseClock(self.device)
        self.checkpointer = Checkpointer(self.out / "checkpoints", cfg.checkpoint.keep, self.rank, self.world)
        self.zero_stage = deepspeed_config(cfg, self.bf16).get("zero_optimization", {}).get("stage", 0)
        # the data before the slow rest (a universal conversion, the model build, deepspeed.initialize)
        try:
            self.loader = PretrainLoader(cfg.data, rank=self.rank, world_size=self.world)
        except ValueError as e:  # e.g. a data.split the shards lack
            raise RefusedStart(f"training data: {e}") from None
        self.shards_manifest = shard_set_digest(cfg.data.shards)  # in the checkpoints, so in the released weights
        if cfg.train.valid_every:  # now, not at the first validation, valid_every steps later and unsaved
            try:
                PretrainLoader(cfg.valid_data(), rank=self.rank, world_size=self.world)
            except ValueError as e:
                raise RefusedStart(f"validation data: {e}; train without it with --train.valid_every=0") from None
        self.resume_tag = self._resume_tag()
        ds_cfg = deepspeed_config(cfg, self.bf16, universal=(self.resume_tag or "").endswith(UNIVERSAL_SUFFIX))
        model = _new_model(cfg, ds_cfg, self.device)
        self.init_weights = self._load_init_weights(model, deepspeed)
        # torch.compile with static shapes: every micro-batch padded to the token budget (see _static_shape)
        self.static_tokens = cfg.data.token_budget if cfg.model.compile else None
        if cfg.model.compile:
            model.compile_blocks(dynamic=False)
            _start_compile_workers()
        with _stop_signals_blocked():  # a JIT op build's processes (FusedAdam: ninja, nvcc, g++) outlive a USR1
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=_adamw(model, cfg.optim, self.device), config=ds_cfg,
                lr_scheduler=lambda opt: build_scheduler(opt, cfg.optim, cfg.train.max_steps))
        build_locks.stop()

    def _load_init_weights(self, model: PretrainModel, deepspeed) -> str | None:
        """train.init_weights into a fresh run's model (continued pretraining); a resume takes its checkpoint's.
        Every rank reads and checks the file, so a bad one is refused by all of them alike."""
        path = self.cfg.train.init_weights
        if not path:
            return None
        if self.resume_tag is not None:
            # e.g. an old out_dir reused by mistake
            self._say(f"train.init_weights ignored: resuming {self.out} from its checkpoint {self.resume_tag}")
            return None
        try:
            state = read_init_weights(path, self.model_cfg)
        except (OSError, ValueError) as e:
            raise RefusedStart(f"train.init_weights: {e}") from None
        # under zero.Init the parameters are partitioned: gather them, load, and let rank 0's values be kept
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0,
                                               enabled=self.cfg.train.zero_init):
            model.load_state_dict(state)
        return path

    # ------------------------------------------------------------------------------------------- run
    def run(self) -> int:
        cfg = self.cfg
        resumed = self._resume()
        if self.rank == 0:  # after the resume: a refused start leaves the run's config as it was
            save_yaml(cfg, self.out / "config.yaml")
        start_step = self.step
        self._log_start(resumed)
        end = cfg.train.max_steps if cfg.train.stop_after is None else min(cfg.train.max_steps, cfg.train.stop_after)
        batches = iter(self.loader)
        last_saved = self.step if resumed else -1
        while self.step < end:
            self.profiler.before_step(self.step + 1)
            t0 = time.perf_counter()
            micro, wait = _take(batches, cfg.train.grad_accum)
            lr = self.engine.get_lr()[0]
            result = self._train_step(micro)
            if self._nonfinite_stop(result):
                self._log_profile(self.profiler.finish())
                self._hold_for_final_scrape()
                return EXIT_NONFINITE
            if result.stepped:
                self.step += 1
                self.tokens += result.tokens
                self.samples += result.samples
                self._record(result, lr, time.perf_counter() - t0, wait)
                self._log_profile(self.profiler.after_step(self.step))
                if self.static_tokens is not None and self.step in (start_step + 1, end):
                    self._log_compile_stats()
                if cfg.train.valid_every and self.step % cfg.train.valid_every == 0:
                    self.validate()
            if result.stop:
                self._log_profile(self.profiler.finish())
                self._save()
                self._log(event="preempted", step=self.step)
                self._say(f"stopped on a signal at step {self.step} with checkpoint {tag_for(self.step)} saved: the "
                          "same command resumes from it")
                return 0
            if result.stepped and cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self._save()
                last_saved = self.step
        self._log_profile(self.profiler.finish())
        finished = self.step >= cfg.train.max_steps
        if finished and cfg.train.valid_every and self.last_valid != self.step:  # also after a late preemption
            self.validate()
        if self.step != last_saved and (cfg.checkpoint.save_at_end or not finished):
            self._save()
        self._log(event="done", step=self.step)
        why = "done" if finished else "stopped (train.stop_after)"
        self._say(f"{why} at step {self.step} of {cfg.train.max_steps}; newest checkpoint: "
                  f"{latest_tag(self.checkpointer.root) or 'none'} in {self.checkpointer.root}")
        return 0

    def _log_start(self, resumed: str | None) -> None:
        ports = _all_gather(self.metrics_port)
        attention = self._attention()
        self._log(event="start", step=self.step, world_size=self.world, resumed_from=resumed,
                  model=self.model_cfg.name, precision="bf16" if self.bf16 else "fp32",
                  device=str(self.device), device_name=device_name(), peak_flops=self.peak_flops,
                  metrics_ports=ports, pid=os.getpid(), init_weights=self.init_weights,
                  shards_manifest=self.shards_manifest, **attention,
                  **{k: [g[k] for g in self.scheduler.optimizer.param_groups] for k in OPTIM_HYPERPARAMETERS})
        if note := attention_dropout_note(attention["attention_backend"], self.model_cfg.attn_dropout):
            self._say(note)

    def _log_profile(self, summary: dict | None) -> None:
        if summary and "error" in summary:
            self._log(event="profile_failed", **summary)
            self._say(f"warning: profiling steps {summary['steps'][0]}-{summary['steps'][1]} failed, training goes "
                      f"on without it: {summary['error']}")
        elif summary:
            self._log(event="profile", **summary)
            self._say(f"profiled steps {summary['steps'][0]}-{summary['steps'][1]}: {summary['wall_s']:.2f} s, GPU "
                      f"busy {summary['gpu_busy_fraction']:.0%}; trace and table in {summary['folder']}")

    def _hold_for_final_scrape(self) -> None:
        """A stop within a scrape interval of the first NaN would leave Prometheus nothing to alert on: the job's
        targets go with it. Only fixed ports are Prometheus targets (port_base 0 is none)."""
        m = self.cfg.metrics
        if self.metrics_port is not None and m.port_base and m.final_scrape_s:
            self._say(f"metrics stay up {m.final_scrape_s:g} s for a final scrape (metrics.final_scrape_s)")
            time.sleep(m.final_scrape_s)

    def _nonfinite_stop(self, result: StepResult) -> bool:
        """Count a step with a dropped (NaN/inf) micro-batch; True when too many came in a row."""
        if not result.nonfinite:
            self.nonfinite_in_row = 0
            return False
        self.nonfinite_in_row += 1
        self.nonfinite_steps += 1
        self.metrics.nonfinite.inc()
        limit = self.cfg.train.max_nonfinite_in_row
        self._log(event="nonfinite", step=self.step + 1, micro_batches=result.nonfinite, stepped=result.stepped,
                  in_row=self.nonfinite_in_row)
        if self.nonfinite_in_row < limit:
            return False
        msg = (f"stopping: {self.nonfinite_in_row} steps in a row had a NaN/inf loss (train.max_nonfinite_in_row="
               f"{limit}); last good step {self.step}. Lower optim.lr, check the data, or resume from the last "
               f"checkpoint.")
        self._log(event="stopped_nonfinite", step=self.step, message=msg)
        self._say(msg)
        return True

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested = True  # acted on at the next step boundary, agreed by all ranks

    # ------------------------------------------------------------------------------------------ step
    def _train_step(self, micro: list[PackedBatch]) -> StepResult:
        """One optimizer step over this rank's micro-batches.

        Loss normalisation: one all-reduce of the masked-token count of the whole step (all ranks, all
        micro-batches) before any backward; each micro-batch's backward loss is its summed CE x world /
        that count (no DeepSpeed 1/grad_accum scaling); DeepSpeed's gradient averaging over ranks divides
        by world, so the gradient is that of (sum of CE over every masked token of the step) / count.
        Non-finite loss: ranks agree per micro-batch (all-reduce of a flag) and all drop its backward; the
        optimizer step runs on the rest (a dropped micro-batch's backward is replaced by one that adds nothing), and
        is skipped when every micro-batch was dropped.
        """
        engine, dev = self.engine, self.device
        masked_local = sum(int((b.targets != IGNORE_INDEX).sum()) for b in micro)
        total_masked = _all_reduce(torch.tensor([masked_local], dtype=torch.float64, device=dev))[0].item()
        scale = self.world / max(total_masked, 1.0)
        self.attempts += 1
        poison = self.attempts in self.cfg.train.inject_nonfinite_at and self.rank == self.world - 1
        poisoned = self.cfg.train.inject_nonfinite_micro % len(micro)
        ce_sum = masked_ok = 0.0
        dropped = owed = backwards = 0
        ids: list[str] = []
        kept: list[PackedBatch] = []  # trained on: a dropped micro-batch counts in no token, sample or FLOP
        for j, raw in enumerate(micro):
            ids.extend(raw.ids or ())
            b = self._static_shape(raw).to(dev, non_blocking=True)
            index = masked_index(b)
            self.clock.start()
            logits = engine(b.tokens, b.cu_seqlens, b.positions, b.max_seqlen, index)
            ce, _ = mlm_sums(logits, b.targets[index])
            self.clock.mark("forward")
            if poison and j == poisoned:
                ce = ce * float("nan")
            bad = _all_reduce(torch.tensor([0.0 if torch.isfinite(ce) else 1.0], device=dev))[0].item()
            if bad:
                dropped += 1
                owed += 1  # its micro-step comes later, if anything steps
                continue
            self._zero_micro_steps(owed)
            owed = 0
            engine.backward(ce * scale, scale_wrt_gas=False)
            self.clock.mark("backward")
            engine.step()
            self.clock.mark("optimizer")
            backwards += 1
            kept.append(raw)
            ce_sum += ce.item()
            masked_ok += int(index.numel())
        if backwards:
            self._zero_micro_steps(owed)  # the last is the boundary: the optimizer steps on the kept micro-batches
        local_tokens = sum(b.num_tokens for b in kept)
        local_samples = sum(b.num_sequences for b in kept)
        local_flops = sum(self.flops.step_flops(b.lengths, int((b.targets != IGNORE_INDEX).sum())) for b in kept)
        stats = _all_reduce(torch.tensor([ce_sum, masked_ok, local_tokens, local_samples, local_flops,
                                          float(self.stop_requested)], dtype=torch.float64, device=dev)).tolist()
        # a shard that two ranks' ranges share (or that ranks meet in later epochs) counts once
        gathered = _all_gather((ids, sorted(self.loader.stats["corrupt_shards"])))
        all_ids = [i for rank_ids, _ in gathered for i in rank_ids]
        corrupt = len(set().union(*(names for _, names in gathered)))
        return StepResult(stepped=backwards > 0, nonfinite=dropped, loss=stats[0] / max(stats[1], 1.0),
                          tokens=int(stats[2]), samples=int(stats[3]), masked=int(stats[1]), flops=stats[4],
                          stop=stats[5] > 0, ids_digest=samples_digest(all_ids), local_tokens=local_tokens,
                          local_samples=local_samples, local_flops=local_flops, corrupt_shards=corrupt,
                          phase_seconds=self.clock.seconds())  # after the sync above: every event has run

    def _zero_micro_steps(self, n: int) -> None:
        """The micro-steps of n dropped micro-batches, each with a backward that adds nothing to the gradients (the
        dummy batch, every logit times zero): every ZeRO stage gets the backward-then-step it counts on (ZeRO-1/2
        reduce the step's accumulated gradients in the boundary's backward; a step without one failed there)."""
        for _ in range(n):
            b = self._static_shape(dummy_batch()).to(self.device)
            logits = self.engine(b.tokens, b.cu_seqlens, b.positions, b.max_seqlen, None)
            self.engine.backward(logits.float().sum() * 0.0, scale_wrt_gas=False)
            self.engine.step()

    def _static_shape(self, b: PackedBatch) -> PackedBatch:
        """With model.compile: pad-only sequences (no loss) up to the token budget, so shapes never change."""
        if self.static_tokens is None:
            return b
        return pad_to_tokens(b, self.static_tokens, chunk=self.cfg.data.max_len)

    def _log_compile_stats(self) -> None:
        """Graphs compiled so far and graph breaks: recompiles or breaks (e.g. from ZeRO hooks) show up here."""
        from torch._dynamo.utils import counters

        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        self._log(event="compile_stats", step=self.step, unique_graphs=graphs, graph_breaks=breaks,
                  static_tokens=self.static_tokens)
        self._say(f"torch.compile after step {self.step}: {graphs} graphs, {breaks} graph breaks "
                  f"(micro-batches padded to {self.static_tokens} tokens)")
        expected = COMPILED_PARTS * (2 if self.validated else 1)   # validation adds eval/no_grad graphs
        if graphs > expected:
            self._say(f"warning: {graphs} graphs where {expected} should serve all blocks: torch.compile recompiled "
                      f"(TORCH_LOGS=recompiles says why), and blocks past torch._dynamo.config.recompile_limit "
                      f"run eager")

    def _record(self, r: StepResult, lr: float, seconds: float, wait: float) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        peak = self.peak_flops
        global_mfu = mfu(r.flops, seconds, self.world, peak)
        self.metrics.record_step(step=self.step, loss=r.loss, lr=lr, grad_norm=grad_norm, tokens=r.local_tokens,
                                 samples=r.local_samples, seconds=seconds,
                                 mfu=mfu(r.local_flops, seconds, 1, peak), loader_wait=wait,
                                 corrupt_shards=self.loader.stats["corrupt_shards_skipped"])
        tokens_per_s = r.tokens / seconds
        self._log(step=self.step, loss=r.loss, lr=lr, grad_norm=grad_norm, tokens=self.tokens,
                  samples=self.samples, tokens_per_s=tokens_per_s, mfu=global_mfu, samples_sha1=r.ids_digest,
                  step_tokens=r.tokens, masked_tokens=r.masked, step_flops=r.flops, step_seconds=seconds,
                  loader_wait_s=wait, corrupt_shards_skipped=r.corrupt_shards, memory_peak_bytes=device_memory()[1],
                  epoch=self.loader.stats["epoch"], **{f"{phase}_s": s for phase, s in r.phase_seconds.items()})
        if self.rank == 0 and (self.step % self.cfg.train.log_every == 0 or self.step == 1):
            _eprint(f"step {self.step}/{self.cfg.train.max_steps} | loss {r.loss:.4f} | lr {lr:.2e} | "
                    f"grad {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | mfu {global_mfu:.2%} | "
                    f"wait {wait:.3f}s | {self.tokens:,} tokens | epoch {self.loader.stats['epoch']}")

    # ---------------------------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Loss, perplexity and masked accuracy on the held-out split (all ranks; equal number of forwards)."""
        cfg, engine, dev = self.cfg, self.engine, self.device
        engine.eval()
        valid = PretrainLoader(cfg.valid_data(), rank=self.rank, world_size=self.world)
        loader = iter(valid)
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # ce, correct, masked, records
        with torch.no_grad():
            while True:
                b = _next_batch(loader, None)
                if _all_reduce(torch.tensor([float(b is not None)], device=dev))[0].item() == 0:
                    break
                real, records = b is not None, b.num_sequences if b is not None else 0
                b = self._static_shape(b if real else dummy_batch()).to(dev)
                index = masked_index(b)
                logits = engine(b.tokens, b.cu_seqlens, b.positions, b.max_seqlen, index)
                if real:
                    ce, correct = mlm_sums(logits, b.targets[index])
                    counts = torch.tensor([index.numel(), records], device=dev, dtype=torch.float64)
                    sums += torch.cat([torch.stack([ce.double(), correct.double()]), counts])
        engine.train()
        ce, correct, masked, records = _all_reduce(sums).tolist()
        unreadable = len(set().union(*_all_gather(sorted(valid.stats["corrupt_shards"]))))
        damage = f" | {unreadable} unreadable held-out shard(s) skipped (see the warnings)" if unreadable else ""
        self.last_valid = self.step
        self.validated = True
        if not masked:  # every held-out shard unreadable (on_corrupt=skip): no number, not a loss of 0
            self._log(event="valid_skipped", step=self.step, reason="no held-out record could be read",
                      corrupt_shards_skipped=unreadable)
            self._say(f"valid @ step {self.step}: skipped, no held-out record could be read{damage}")
            return {}
        result = {**validation_summary(ce, correct, masked, records), "corrupt_shards_skipped": unreadable}
        loss = result["loss"]
        self.metrics.valid_loss.set(loss)
        self._log(event="valid", step=self.step, **result)
        self._say(f"valid @ step {self.step}: loss {loss:.4f} | ppl {result['perplexity']:.3f} | "
                  f"acc {result['accuracy']:.3%} | {int(masked):,} masked tokens in {int(records):,} records"
                  f"{damage}")
        return result

    # -------------------------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        t0 = time.perf_counter()
        state = {"step": self.step, "tokens": self.tokens, "samples": self.samples,
                 "nonfinite_steps": self.nonfinite_steps, "last_valid": self.last_valid, "world_size": self.world,
                 "seed": self.cfg.train.seed, "zero_stage": self.zero_stage, "bf16": self.bf16,
                 "loader_states": _all_gather(self.loader.state_dict()), "model": self.model_cfg.to_dict(),
                 "config": to_dict(self.cfg), "shards_manifest": self.shards_manifest, "time": time.time()}
        tag = self.checkpointer.save(self.engine, self.step, state)
        seconds = time.perf_counter() - t0
        self.metrics.record_checkpoint(seconds)
        self._log(event="checkpoint", step=self.step, tag=tag, seconds=seconds)

    def _serve_metrics(self) -> int | None:
        """The bound port; None when a fixed port is taken (another job's rank on this node, most likely): a
        requeue that lands beside another job must not end a weeks-long run over its metrics."""
        m = self.cfg.metrics
        port = m.port_base + self.local_rank if m.port_base else 0
        try:
            return self.metrics.serve(m.bind, port)
        except OSError as e:
            where = f"metrics endpoint {m.bind}:{port} (metrics.port_base {m.port_base} + local rank {self.local_rank})"
            if e.errno != errno.EADDRINUSE:  # e.g. a metrics.bind address this node does not have
                raise RefusedStart(f"{where}: {e.strerror or e}; check metrics.bind (an address of this node, "
                                   "0.0.0.0: all), or metrics.enabled=false") from None
            rank = os.environ.get("RANK", "0")
            _eprint(f"python -m pretrain.train: warning: rank {rank}: {where}: {e.strerror or e}; another job "
                    "on this node may hold it: this rank trains on without metrics (its Prometheus target finds "
                    "the other job there: RnalmRankDown; give jobs that share nodes other metrics.port_base values)")
            return None

    def _attention(self) -> dict:
        """The backend training runs with and the attention dropout it really applies (torch_varlen has none)."""
        model = self.engine.module
        dtype = torch.bfloat16 if self.bf16 else torch.float32  # what q/k/v are: 'auto' gives fp32 to sdpa
        backend = resolve_backend(model.attention_backend, self.device, model.applies_attention_dropout, dtype)
        applied = 0.0 if backend in WITHOUT_DROPOUT else self.model_cfg.attn_dropout
        return {"attention_backend": backend, "attention_dropout": applied}

    def _resume_tag(self) -> str | None:
        """The newest good checkpoint, or its universal form when it was written by another number of ranks
        (converted now unless `pretrain.convert --universal` did it before); None for a fresh start."""
        ckpt = self.checkpointer
        removed = ckpt.remove_partial_saves()
        if removed:
            self._log(event="removed_partial_checkpoints", dirs=removed)
            self._say(f"removed unfinished checkpoints (a save or a pruning cut short): {', '.join(removed)}")
        tag = latest_tag(ckpt.root)
        if tag is None:
            return None
        if not self.cfg.checkpoint.resume:
            raise CheckpointError(f"{ckpt.root} holds checkpoints of an earlier run (newest {tag}) and "
                                  f"checkpoint.resume=false: use another train.out_dir, or remove them")
        state = read_trainer_state(ckpt.root, tag)
        changed = model_changes(state.get("model", {}), self.model_cfg)
        if changed:
            raise CheckpointError(f"{ckpt.root / tag} was written by another model than this run's model section "
                                  f"(theirs, this run's): {changed}; resume with the model it was written with, or "
                                  f"{FROM_ITS_WEIGHTS}")
        layout = {k: (state[k], now) for k, now in (("zero_stage", self.zero_stage), ("bf16", self.bf16))
                  if k in state and state[k] != now}
        if layout:
            raise CheckpointError(f"{ckpt.root / tag} was written with another ZeRO stage or precision than this "
                                  f"run's train.ds_config and train.precision give (theirs, this run's): {layout}; "
                                  f"resume with the settings it was written with, or {FROM_ITS_WEIGHTS}")
        saved_world = state.get("world_size")
        try:
            check_files(ckpt.root / tag, saved_world)
            check_archives(ckpt.root / tag, self.rank, self.world)  # a resumed run would prune the older ones
        except CheckpointError as e:
            older = [t for t in complete_tags(ckpt.root) if t < tag]
            raise CheckpointError(f"{e}: the run cannot resume from {tag}. To resume from the checkpoint before it ("
                                  f"{older[-1] if older else 'none'}), move it aside: mv {ckpt.root / tag} "
                                  f"{ckpt.root / ('damaged-' + tag)}") from None
        if saved_world == self.world:
            return tag
        universal = ckpt.root / (tag + UNIVERSAL_SUFFIX)
        if universal.is_dir():
            try:
                check_archives(universal, self.rank, self.world)
            except CheckpointError as e:  # it is derived from the checked tag: convert again
                self._say(f"{e}: converting {tag} again")
                if self.rank == 0:
                    shutil.rmtree(universal)
                dist.barrier()
        if not universal.is_dir():
            self._convert_to_universal(tag, saved_world)
        return tag + UNIVERSAL_SUFFIX

    def _convert_to_universal(self, tag: str, saved_world: int) -> None:
        """DeepSpeed loads ZeRO shards only at the world size that wrote them: rank 0 converts the checkpoint
        to the universal form, which any world size loads. The other ranks wait for its directory (renamed
        into place when complete) rather than in a collective: giga's conversion can outlast the 10-minute
        collective timeout. A failed conversion ends rank 0, and the launcher (srun, torchrun) the rest."""
        target = self.checkpointer.root / (tag + UNIVERSAL_SUFFIX)
        if self.rank == 0:
            _eprint(f"{self.checkpointer.root / tag} was written by {saved_world} ranks, this run has "
                    f"{self.world}: converting it to DeepSpeed's universal form ({target.name})")
            t0 = time.perf_counter()
            with _stop_signals_blocked():  # pretrain.sh's USR1s (every 20 s) would kill ds_to_universal: exit 2
                to_universal(self.checkpointer.root, tag)
            self._log(event="universal_conversion", tag=tag, saved_world_size=saved_world,
                      world_size=self.world, seconds=time.perf_counter() - t0)
        while not target.is_dir():
            time.sleep(1)

    def _resume(self) -> str | None:
        tag = self.resume_tag
        if tag is None:
            return None
        built = [{k: g[k] for k in OPTIM_HYPERPARAMETERS} for g in self.scheduler.optimizer.param_groups]
        state = self.checkpointer.load(self.engine, tag)  # new param_groups: the checkpoint's
        # this run's settings, not the checkpoint's (a universal load also sets every group to the first's decay)
        for group, own in zip(self.scheduler.optimizer.param_groups, built):
            group.update(own)
        self.step, self.tokens, self.samples = state["step"], state["tokens"], state["samples"]
        self.metrics.step.set(self.step)  # the Step panel would read 0 until the first new step
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.last_valid = state.get("last_valid", -1)
        try:
            self.loader.load_state_dict(state["loader_states"])
        except ValueError as e:  # its sample stream belongs to other data settings (seed, shards, ...)
            raise CheckpointError(f"{self.checkpointer.root / tag}: {e}; resume with the data settings it was "
                                  f"written with, or {FROM_ITS_WEIGHTS}") from None
        set_schedule(self.scheduler, self.cfg.optim, self.cfg.train.max_steps)
        changed = changed_settings(state.get("config", {}), to_dict(self.cfg))
        if state.get("world_size", self.world) != self.world:  # tokens per step scale with it (a user review)
            changed["world_size"] = (state["world_size"], self.world)
        if changed:
            self._log(event="config_changed", step=self.step, changes=changed)
        self._say(f"resumed from {self.checkpointer.root / tag} at step {self.step}"
                  + (f"; settings changed since (then, now): {changed}" if changed else ""))
        return tag

    def _say(self, line: str) -> None:
        """One line on rank 0's stderr, for the person watching the run (log.jsonl has the details)."""
        if self.rank == 0:
            _eprint(line)

    def _log(self, **record) -> None:
        if self.log is not None:
            self.log.write(record)

    def close(self) -> None:
        self.metrics.close()
        if self.log is not None:
            self.log.close()


# ------------------------------------------------------------------------------------------------ helpers
class LogWriteError(RuntimeError):
    """log.jsonl could not be written (e.g. a full disk)."""


class _JsonLog:
    """One JSON record a line, appended; the file opened at the first record (a refused start writes none). A line
    that a failed write left torn is closed first, so that the next record stays a line of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = None

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        try:
            if self._f is None:
                self._f = self._open()
            self._f.write(json.dumps(record, default=float) + "\n")
        except OSError as e:
            raise LogWriteError(f"could not write {self.path}: {e.strerror or e}") from None

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        f = open(self.path, "a", buffering=1)
        if torn:
            f.write("\n")
        return f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _adamw(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # By the full shape: a parameter built inside deepspeed.zero.Init (train.zero_init) is already partitioned, its
    # tensor an empty 1-d placeholder and its real shape in ds_shape.
    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if matrix(p)]
    no_decay = [p for p in model.parameters() if not matrix(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.adamw == "deepspeed":
        from deepspeed.ops.adam import FusedAdam  # builds its op on first use
        return FusedAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, adam_w_mode=True)
    fused = cfg.adamw == "torch_fused" or (cfg.adamw == "auto" and device.type == "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


@contextlib.contextmanager
def _stop_signals_blocked():
    """Processes started inside inherit the stop signals blocked (across fork and exec): Slurm and torchrun send
    SIGTERM/SIGUSR1 to every process of the step, and a helper process killed by one would crash the rank before
    it can save. The rank itself gets any signal that arrived meanwhile when the mask is restored."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _next_batch(batches, default=StopIteration):
    """next() with two guards for the DataLoader worker processes it may start:
    - outside the training RNG stream: a DataLoader draws its workers' base seed from the global torch RNG,
      which would shift dropout after a resume (or a validation) and break exact replay;
    - inside _stop_signals_blocked. multiprocessing's resource tracker is started first, inside the mask: its
      start unblocks SIGTERM in the calling thread."""
    with _stop_signals_blocked():
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        with torch.random.fork_rng(devices=[]):
            return next(batches) if default is StopIteration else next(batches, default)


def _start_compile_workers() -> None:
    """Start inductor's compile worker processes (with Triton: a sidecar and its pool) inside
    _stop_signals_blocked, rather than lazily at the first compile: once a forwarded USR1 has killed them, the next
    compile (the first steps', the first validation's) waits on them forever, and the rank never saves."""
    from torch._inductor.async_compile import maybe_warm_pool

    with _stop_signals_blocked():
        maybe_warm_pool()


def _take(batches, n: int) -> tuple[list[PackedBatch], float]:
    t0 = time.perf_counter()
    try:
        micro = [_next_batch(batches) for _ in range(n)]
    except StopIteration:
        raise RuntimeError("the training loader ended; pretraining needs data.infinite=true") from None
    return micro, time.perf_counter() - t0


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def attention_dropout_note(backend: str, attn_dropout: float) -> str | None:
    """The line that says a configured attention dropout is not applied (the original's recipe has 0.1)."""
    if attn_dropout > 0 and backend in WITHOUT_DROPOUT:
        return (f"warning: model.attn_dropout={attn_dropout:g} is not applied: the {backend} attention kernel has no "
                "dropout (model.attention_backend=auto takes torch_flash or flash_attn, which apply it, where they "
                "run; --model.attn_dropout=0 says so)")
    return None


def _all_gather(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _use_bf16(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def _new_model(cfg: PretrainConfig, ds_cfg: dict, device: torch.device) -> PretrainModel:
    """The run's model with its seed's initial weights (identical on every rank), under zero.Init with
    train.zero_init; built where it trains: on a CPU, giga's random init alone takes ~9 s (the generator is serial).
    ZeRO-3 takes each block as a leaf: it gathers the block's parameters once at its entry instead of hooking each
    of its 13 submodules (a fifth less host time per step for 33 narrow blocks on a CPU), so no hook runs inside a
    compiled part either."""
    import deepspeed
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    torch.manual_seed(cfg.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg) if cfg.train.zero_init else device:
        model = PretrainModel(cfg.model_config())
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        deepspeed.utils.set_z3_leaf_modules(model, [TransformerBlock])
    # what ds_to_universal requires of ZeRO-1/2 checkpoints (no tensor or pipeline parallel parameters to describe
    # here): the engine saves it, and such runs can then resume at another world size as ZeRO-3 runs do
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    return model


def _default_distributed_env() -> None:
    """Env from torchrun / srun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); plain python: 1 rank."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))


def _eprint(msg: str) -> None:
    """One write: the ranks' lines do not interleave mid-line (print writes the text and its newline apart)."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _exit(code: int, clean: bool) -> None:
    """Leave without the rare gloo SIGABRT at interpreter shutdown (see ../shared/notes/spike_deepspeed_cpu.md)."""
    if clean and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already leaving; the exit code tells the story
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = from_cli(PretrainConfig, argv, prog="python -m pretrain.train",
                   description="Pretrain a RiNALMo-class model with DeepSpeed on dataprep shards.")
    try:
        cfg.validate()
        read_manifest(cfg.data.shards)  # a wrong data.shards refused before the slow start-up (DeepSpeed, model)
    except (ValueError, ShardError) as e:
        _eprint(f"python -m pretrain.train: error: {e}")
        sys.exit(2)
    lock = _lock_out_dir(cfg.train.out_dir)
    try:
        trainer = Trainer(cfg)
        code = trainer.run()
        trainer.close()
    except (CheckpointSaveError, LogWriteError) as e:  # e.g. a full disk: a crash, but with the cause in one line
        _eprint(f"python -m pretrain.train: error: {e}")
        code = None
    except (CheckpointError, RefusedStart) as e:  # e.g. checkpoints this run may not or cannot resume
        _eprint(f"python -m pretrain.train: error: {e}")
        code = 2
    except ShardError as e:  # data.on_corrupt=fail, or a stream with nothing readable left: a rerun meets it again
        _eprint(f"python -m pretrain.train: error: unreadable shard data: {e}")
        code = EXIT_DATA
    except KeyboardInterrupt:  # Ctrl-C reaches every rank (torchrun passes it on): a line each, no traceback
        _eprint(f"python -m pretrain.train: interrupted; the same command resumes from the newest checkpoint "
                f"({latest_tag(Path(cfg.train.out_dir) / 'checkpoints') or 'none yet'})")
        code = 130
    except Exception:  # noqa: BLE001 - print, then leave without waiting on peers that may be stuck
        traceback.print_exc()
        code = None
    if lock is not None:
        lock.release()
    _exit(1 if code is None else code, clean=code == 0)


def _lock_out_dir(out_dir: str) -> RunLock | None:
    """Rank 0 (RANK from torchrun/srun; plain python is rank 0) locks out_dir before anything is written there;
    exit 2 when another run holds it (the launcher then stops the other ranks)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = RunLock(out_dir)
    try:
        taken_over = lock.acquire()
    except RunLockError as e:
        _eprint(f"python -m pretrain.train: error: {e}")
        sys.exit(2)
    if taken_over:
        _eprint(f"took over {lock.path}: {taken_over}")
    return lock


if __name__ == "__main__":
    main()
