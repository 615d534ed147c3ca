"""Per-rank Prometheus endpoint for the trainer (prometheus-client, a private registry per process).

Port = port_base + LOCAL_RANK, so every rank of a node has its own target; file_sd adds the `rank` and
`slurm_job_id` labels. No per-step labels (the step is a counter value, not a label).
"""
from __future__ import annotations

import os
import resource
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class TrainMetrics:
    def __init__(self, run_id: str, model: str, world_size: int, slurm_job_id: str = "") -> None:
        r = self.registry = CollectorRegistry()
        self.tokens = Counter("rnalm_train_tokens", "Real (non-pad) tokens trained on by this rank", registry=r)
        self.samples = Counter("rnalm_train_samples", "Sequences trained on by this rank", registry=r)
        self.steps = Counter("rnalm_train_steps", "Optimizer steps taken by this process", registry=r)
        self.step = Gauge("rnalm_train_step", "Training step of the run (continues across resumes)", registry=r)
        self.nonfinite = Counter("rnalm_train_nonfinite_steps", "Steps skipped for a NaN/inf loss", registry=r)
        self.loader_wait = Counter("rnalm_dataloader_wait_seconds", "Time spent waiting for batches", registry=r)
        self.corrupt_shards = Gauge("rnalm_dataloader_corrupt_shards", "Shards this rank's training loader skipped "
                                    "as corrupt or missing (data.on_corrupt=skip) since the process started",
                                    registry=r)
        # Served from the first step on (registered then): a 0 scraped during start-up would be the job's 1 h loss
        # minimum for RnalmLossDiverging, which then fired ~10 min into every run and every requeued rerun.
        self.loss = Gauge("rnalm_train_loss", "MLM loss of the last step (all ranks)", registry=None)
        self.lr = Gauge("rnalm_train_learning_rate", "Learning rate of the last step", registry=r)
        self.grad_norm = Gauge("rnalm_train_grad_norm", "Global gradient norm before clipping", registry=r)
        self.step_seconds = Histogram("rnalm_train_step_duration_seconds", "Wall time of one optimizer step",
                                      buckets=STEP_SECONDS_BUCKETS, registry=r)
        self.tokens_per_s = Gauge("rnalm_train_tokens_per_second", "Real tokens/s of this rank", registry=r)
        self.mfu = Gauge("rnalm_train_mfu_ratio", "Model FLOPs utilisation of this rank (0..1)", registry=r)
        self.mem = Gauge("rnalm_device_memory_allocated_bytes",
                         "Device memory allocated (CPU runs: resident set size)", registry=r)
        self.mem_peak = Gauge("rnalm_device_memory_peak_bytes",
                              "Peak device memory allocated (CPU runs: peak resident set size)", registry=r)
        self.ckpt_seconds = Gauge("rnalm_checkpoint_duration_seconds", "Duration of the last checkpoint save",
                                  registry=r)
        self.ckpt_time = Gauge("rnalm_checkpoint_last_success_timestamp_seconds",
                               "Unix time of the last successful checkpoint", registry=r)
        self.last_step_time = Gauge("rnalm_train_last_step_timestamp_seconds", "Unix time of the last step",
                                    registry=r)
        # what the stall and checkpoint-age alerts count from before a first step (counters' `_created` series
        # would do, but Prometheus drops them with created-timestamp ingestion and clients may not export them)
        self.start_time = Gauge("rnalm_train_start_timestamp_seconds", "Unix time this process began its start-up",
                                registry=r)
        self.start_time.set_to_current_time()
        self.valid_loss = Gauge("rnalm_valid_loss", "Loss on the held-out split at the last validation (NaN before "
                                "the first)", registry=r)
        self.valid_loss.set(float("nan"))  # not 0: a dashboard would plot a perfect loss that was never measured
        self.info = Gauge("rnalm_run_info", "Run metadata (value is always 1)",
                          ["run_id", "model", "world_size", "slurm_job_id"], registry=r)
        self.info.labels(run_id=run_id, model=model, world_size=str(world_size), slurm_job_id=slurm_job_id).set(1)
        self._loss_served = False
        self.port: int | None = None
        self._server = None

    def serve(self, bind: str, port: int) -> int:
        """Start the HTTP endpoint (port 0: any free port); returns the bound port."""
        self._server, _thread = start_http_server(port, addr=bind, registry=self.registry)
        self.port = self._server.server_address[1]
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()  # the port is free again at once, not at garbage collection
            self._server = None

    def record_step(self, *, step: int, loss: float, lr: float, grad_norm: float, tokens: int, samples: int,
                    seconds: float, mfu: float, loader_wait: float, corrupt_shards: int) -> None:
        self.steps.inc()
        self.step.set(step)
        self.tokens.inc(tokens)
        self.samples.inc(samples)
        self.loader_wait.inc(loader_wait)
        self.corrupt_shards.set(corrupt_shards)
        self.loss.set(loss)
        if not self._loss_served:
            self.registry.register(self.loss)
            self._loss_served = True
        self.lr.set(lr)
        self.grad_norm.set(grad_norm)
        self.step_seconds.observe(seconds)
        self.tokens_per_s.set(tokens / seconds if seconds > 0 else 0.0)
        self.mfu.set(mfu)
        self.last_step_time.set(time.time())
        self.record_memory()

    def record_memory(self) -> None:
        allocated, peak = device_memory()
        self.mem.set(allocated)
        self.mem_peak.set(peak)

    def record_checkpoint(self, seconds: float) -> None:
        self.ckpt_seconds.set(seconds)
        self.ckpt_time.set(time.time())


def device_memory() -> tuple[int, int]:
    """(allocated, peak) bytes: CUDA allocator on GPU; on CPU the process's current and peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak, peak
    return rss, max(rss, peak)  # ru_maxrss is sampled by the kernel and can lag the current RSS
