"""A window of training steps under torch.profiler: where a step's time goes.

`train.profile_at=N` profiles PROFILE_STEPS steps from step N (after a resume past N: from the first step run) on
rank 0 and writes to out_dir/profile/: `trace.json.gz`
(Chrome/Perfetto trace) and `ops.txt` (torch.profiler's table by self time), and to log.jsonl an event "profile":
the window's wall seconds, how much of it the GPU was busy (the union of its kernels' intervals; the rest is
time the GPU waited for the host: Python, hooks, syncs, launches), the kernels' time by kind (matmul,
attention, communication, optimizer, other) and the top kernels, or on a CPU the top operators by self time.
The window holds whatever those steps do: a validation or checkpoint save in it counts in its wall seconds.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

PROFILE_STEPS = 3
TOP = 25
# Kernel name patterns, first match wins: cuBLAS/CUTLASS GEMMs (sm90_xmma..., nvjet..., cutlass...), flash and
# memory-efficient attention, NCCL collectives, fused/multi-tensor optimizer kernels, inductor's fused kernels,
# copies (dtype casts, ZeRO's gathers into flat buffers at one GPU, cat), and eager torch's other kernels (pointwise,
# norms, reductions, dropout, indexing, the loss): the memory-bound work that compiling fuses.
KINDS = (("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|wgmma|cublas|splitk", re.I)),
         ("attention", re.compile(r"flash|fmha|attention", re.I)),
         ("communication", re.compile(r"nccl", re.I)),
         ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
         ("compiled", re.compile(r"^triton_")),
         ("copy", re.compile(r"memcpy|memset|copy_kernel|catarray", re.I)),
         ("elementwise", re.compile(r"elementwise|reduce_kernel|layer_norm|softmax|dropout|index|nll_loss|embedding",
                                    re.I)))


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def device_kernels(events) -> list[tuple[str, float, float]]:
    """(name, start, end) of what the GPU ran. Its copies of user annotations (`Optimizer.step#AdamW.step`, each
    compiled graph's `## Call CompiledFxGraph ##`) are spans over many kernels: counted, they filled the launch gaps
    inside them (GPU busy share too high) and doubled the optimizer's time."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


def summarise_kernels(kernels: Iterable[tuple[str, float, float]], wall_s: float) -> dict:
    """kernels: (name, start_us, end_us). Busy time is the union of the intervals (streams overlap)."""
    kernels = sorted(kernels, key=lambda k: k[1])
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    busy = 0.0
    end = float("-inf")
    for name, start, stop in kernels:
        by_kind[kernel_kind(name)] += (stop - start) / 1e6
        by_name[name][0] += (stop - start) / 1e6
        by_name[name][1] += 1
        if stop > end:
            busy += (stop - max(start, end)) / 1e6
            end = stop
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {"wall_s": wall_s, "gpu_busy_s": busy, "gpu_busy_fraction": busy / wall_s if wall_s > 0 else 0.0,
            "kernel_s_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"name": n[:160], "s": s, "calls": c} for n, (s, c) in top]}


class PhaseClock:
    """Seconds of a step's phases as the device ran them, always on and cheap: CUDA events on a GPU (read after the
    step's own sync), wall time on a CPU (where ops run as they are called). `mark(phase)` closes the phase that
    began at the previous mark, so a GPU's wait for the host (a sync, slow launches) counts in the phase where it
    happens; `start()` opens a micro-batch. Also the host's own time per phase (`<phase>_host`): a phase whose host
    time is close to its device time kept the GPU waiting for the host. Read with `seconds()` after the step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, float, object]] = []

    def start(self) -> None:
        self.mark("")

    def mark(self, phase: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((phase, time.perf_counter(), event))

    def seconds(self) -> dict[str, float]:
        """{phase: device seconds, phase_host: host seconds}, summed over the micro-batches since the last call;
        resets."""
        totals: dict[str, float] = defaultdict(float)
        if self.cuda and self.marks:
            self.marks[-1][2].synchronize()  # done already after the step's sync; elapsed_time needs it certain
        for (_, t0, e0), (phase, t1, e1) in zip(self.marks, self.marks[1:]):
            if phase:
                totals[phase] += e0.elapsed_time(e1) / 1e3 if self.cuda else t1 - t0
                totals[f"{phase}_host"] += t1 - t0
        self.marks = []
        return dict(totals)


class StepProfiler:
    """Call before_step(n) before step n runs and after_step(n) after it; returns the summary at the window's end."""

    def __init__(self, at: int, folder: Path, device: torch.device) -> None:
        self.at, self.folder, self.device = at, folder, device      # at 0: never
        self.prof: profile | None = None
        self.error: str | None = None    # why profiling failed, until finish() reports it
        self.t0, self.first, self.last, self.seen, self.done = 0.0, 0, 0, 0, False

    def before_step(self, step: int) -> None:
        if self.at and step >= self.at and self.prof is None and not self.done:
            self.first = self.seen = step
            self.last = step + PROFILE_STEPS - 1
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._sync()  # a device error here is the run's, not the profiler's
            try:
                self.prof = profile(activities=activities)
                self.prof.__enter__()
            except Exception as e:  # diagnostics: training goes on without them
                self.prof, self.done, self.error = None, True, f"{type(e).__name__}: {e}"
            self.t0 = time.perf_counter()

    def after_step(self, step: int) -> dict | None:
        self.seen = step
        return self.finish() if (self.prof is not None or self.error is not None) and step >= self.last else None

    def finish(self) -> dict | None:
        """Stop (also when the run ends inside the window) and write the files; None when not profiling. A profiler
        that failed gives {"error": why} instead of stopping the run: it is a diagnostic, and in a benchmark its
        failure would take the run's own numbers with it."""
        if self.error is not None:
            error, self.error = self.error, None
            return {"steps": [self.first, self.seen], "error": error}
        if self.prof is None:
            return None
        self.done = True
        prof, self.prof = self.prof, None
        try:
            self._sync()  # a device error here is the run's, not the profiler's: it goes on up, the profiler stopped
            wall = time.perf_counter() - self.t0
        finally:
            error = _stop(prof)
        try:
            return {"steps": [self.first, self.seen], "error": error} if error else self._summarise(prof, wall)
        except Exception as e:
            return {"steps": [self.first, self.seen], "error": f"{type(e).__name__}: {e}"}

    def _summarise(self, prof: profile, wall: float) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / "trace.json.gz"))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        (self.folder / "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60) + "\n")
        kernels = device_kernels(prof.events())
        summary = summarise_kernels(kernels, wall)
        summary["steps"] = [self.first, self.seen]
        if not kernels:  # a CPU run: the operators instead
            ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:TOP]
            summary["top_cpu_ops"] = [{"name": e.key, "s": e.self_cpu_time_total / 1e6, "calls": e.count}
                                      for e in ops]
        summary["folder"] = str(self.folder)
        return summary

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _stop(prof: profile) -> str | None:
    """Stop the profiler; why it failed to, if it did."""
    try:
        prof.__exit__(None, None, None)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"
