"""One lent-GPU call's plan inside a wall-clock budget; what was measured is in $OUT after every step.

    python bench/gpu/runner.py session|levers|e2e      (normally through bench/gpu/{session,levers,e2e}.sh)

Plans (each fits one device call of at most 10 minutes; a session has 15 device-minutes, machine start included):
- session: the environment, bench/pretrain_bench.py on giga, the trainer's defaults vs the padded original
  recipe (issue 4 step 7, issue 7 baseline), bench/model_bench.py on giga (issue 2 step 6), then issue 7's
  levers (LEVERS: one pretrain_bench packed run each, best expected first) until the time is up; the summary's
  `levers_left` and the last lines name those left for a second call;
- levers:  the data loader alone on the GPU node's CPUs (bench/loader_bench.py, 0/1/4 workers, 32k budget), a
  giga block's activation memory and matmul operand alignment (short, measured nowhere else), then the levers
  named by RNALM_GPU_LEVERS=a,b (unset: all; empty: none);
- e2e:     bench/finetune_gpu_e2e.py --stage all (issue 6 step 10), its time budgets fitted to what is left.

Every step runs as a child process group with a timeout of min(its cap, time left); its output goes to stdout
and $OUT/session.log with a timestamp. $OUT/summary.json (plan, steps with status/rc/seconds, the results each
step wrote) is rewritten atomically after every step, so a later failure or the call's own time limit never
loses what came before. A failed step keeps what it wrote of its result (pretrain_bench writes its packed run
before the padded one) and the step lines of a trainer log behind it. The first step (env) failing stops the
plan: without CUDA or an importable DeepSpeed nothing else is worth the time. A lever skipped, or cut short by
the plan's deadline (not by its own cap), is named in `levers_left` for the next call.

Environment: OUT (required), RNALM_GPU_T0 (epoch seconds the call started; default now),
RNALM_GPU_BUDGET_S (default and at most 560: a call's limit is 600 s), RNALM_GPU_WORK (default /tmp/rnalm_gpu), RNALM_SHARED_DATA (default
./shared/data), RNALM_GPU_SESSION_TINY=1 (tiny models and step counts on CPU: tests the plans' logic).
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = os.environ.get("RNALM_GPU_SESSION_TINY") == "1"
PY = sys.executable
RESERVE_S = 8.0          # kept back at the end for the last summary
# trainer runs (the baseline, the levers: one trainer) failing in a row, not out of memory or time: the rest would
# fail alike, and the device minutes they would take are better left for a fix and a second call
TRAINER_FAILURES_STOP = 2
MAX_BUDGET_S = 560.0     # a device call runs at most 600 s, machine start-up of the plan's shell included


@dataclass
class Step:
    name: str
    argv: list[str]
    cap: float                         # seconds at most
    min_seconds: float = 20.0          # skipped when less than this is left
    result: Path | None = None         # JSON the step writes; copied into the summary
    essential: bool = False            # failure stops the plan
    oom_retry: list[str] = field(default_factory=list)   # extra argv for one retry after CUDA OOM
    meta: dict = field(default_factory=dict)
    min_gpu_gib: float = 0.0           # skipped on a GPU with less memory (env.json's memory_total_gib)
    trainer_log: Path | None = None    # where its trainer logs (default: pretrain_bench's run under its TMPDIR)
    trainer_run: bool = False          # a pretrain_bench run (TRAINER_FAILURES_STOP)


class Plan:
    def __init__(self, name: str, out: Path, work: Path, t0: float, budget: float) -> None:
        self.name, self.out, self.work, self.deadline = name, out, work, t0 + budget
        self.log = open(out / "session.log", "a", buffering=1)
        self.summary = {"plan": name, "tiny": TINY, "budget_s": budget, "started": _stamp(t0), "steps": []}
        self.trainer_failures: list[str] = []   # the trainer runs that failed in a row
        self.write_summary()

    def left(self) -> float:
        return self.deadline - time.time()

    def say(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} {self.name} {self.left():5.0f}s left] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def write_summary(self) -> None:
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / "summary.json")

    def run(self, step: Step) -> dict:
        record = {"name": step.name, **step.meta, "cmd": " ".join(step.argv)}
        self.summary["steps"].append(record)
        room, gib = self.left() - RESERVE_S, self.gpu_gib()
        if gib is not None and gib < step.min_gpu_gib:  # an OOM, then a retry with every block checkpointed: another
            # setup than the lever's (~-25%), for minutes of a short session
            record.update(status="skipped", unfit=True,
                          reason=f"needs ~{step.min_gpu_gib:.0f} GiB of GPU memory, this GPU has {gib:.0f}")
        elif room < step.min_seconds:
            record.update(status="skipped", reason=f"{room:.0f} s left, needs {step.min_seconds:.0f}")
        elif step.trainer_run and len(self.trainer_failures) >= TRAINER_FAILURES_STOP:
            record.update(status="skipped", reason=f"{' and '.join(self.trainer_failures)} failed (not out of memory "
                                                   "or time): the same trainer would fail again; fix it first")
        if record.get("status") == "skipped":
            self.say(f"{step.name}: SKIPPED ({record['reason']})")
            self.write_summary()
            return record
        if step.result is not None:  # a warm machine keeps the last call's: only this run's counts
            step.result.unlink(missing_ok=True)
        record.update(self._attempt(step, step.argv, min(step.cap, room)))
        # an OOM after the step wrote its result (pretrain_bench's padded baseline, after the packed run) is not
        # the packed run's to retry with activation checkpointing
        wrote = step.result is not None and step.result.exists()
        retry = record["status"] == "failed" and record.get("oom") and step.oom_retry and not wrote
        if retry and self.left() - RESERVE_S > step.min_seconds:
            self.say(f"{step.name}: CUDA out of memory; retrying with {' '.join(step.oom_retry)}")
            first = ("status", "rc", "seconds", "tail", "oom", "partial_trainer_steps")
            record["first_try"] = {k: record.pop(k) for k in first if k in record}
            argv = step.argv + step.oom_retry
            record.update(self._attempt(step, argv, min(step.cap, self.left() - RESERVE_S)), cmd=" ".join(argv))
        if step.result is not None and step.result.exists():
            record["result"] = _read_result(step.result)
        # failed before writing its numbers (after them: the padded baseline's, not the trainer's)
        if step.trainer_run and record["status"] == "failed" and not record.get("oom") and "result" not in record:
            self.trainer_failures.append(step.name)
        elif step.trainer_run and record["status"] == "ok":
            self.trainer_failures = []
        self.write_summary()
        return record

    def gpu_gib(self) -> float | None:
        """The GPU's memory as the env step found it (None before it, or without a GPU)."""
        try:
            return json.loads((self.out / "env.json").read_text()).get("memory_total_gib")
        except (OSError, ValueError):
            return None

    def _attempt(self, step: Step, argv: list[str], timeout: float) -> dict:
        tmp = self.work / step.name / "tmp"   # a failed pretrain_bench leaves its trainer log here
        tmp.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        # JIT-built ops: on the GPU a dir of its own per step (only FusedAdam's lever builds; a build killed with its
        # step leaves a lock every later build would wait on); on CPUs (tiny mode: tests, rehearsals) every trainer
        # start builds DeepSpeed's comm op, 25-60 s, so the plan's steps share one
        extensions = self.work / "torch_extensions" if TINY else tmp.parent / f"torch_extensions_{t0:.0f}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp), PYTHONWARNINGS="ignore::FutureWarning",
                   TORCHINDUCTOR_CACHE_DIR=str(self.work / "inductor"),   # shared: a 2nd compile reuses kernels
                   TORCH_EXTENSIONS_DIR=str(extensions))
        self.say(f"{step.name}: start (timeout {timeout:.0f} s): {' '.join(argv)}")
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        tail: collections.deque[str] = collections.deque(maxlen=30)
        oom = threading.Event()
        reader = threading.Thread(target=self._pump, args=(proc, step.name, tail, oom), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.say(f"{step.name}: TIMEOUT after {timeout:.0f} s: killing its processes")
            _kill_tree(proc)
        reader.join(timeout=5)
        seconds = round(time.time() - t0, 1)
        status = "timeout" if timed_out else ("ok" if proc.returncode == 0 else "failed")
        result = {"status": status, "rc": proc.returncode, "seconds": seconds}
        if timed_out and timeout < step.cap:
            result["cut_by_deadline"] = True
        if status != "ok":
            result.update(tail=list(tail)[-15:], oom=oom.is_set())
            steps = _partial_trainer_steps(tmp, t0, step.trainer_log)
            if steps:
                result["partial_trainer_steps"] = steps
        self.say(f"{step.name}: {status.upper()} (rc {proc.returncode}) in {seconds} s")
        return result

    def _pump(self, proc: subprocess.Popen, name: str, tail, oom: threading.Event) -> None:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if "out of memory" in line.lower() or "OutOfMemoryError" in line:
                oom.set()
            stamped = f"{time.strftime('%H:%M:%S')} {name} | {line}"
            print(stamped, flush=True)
            self.log.write(stamped + "\n")

    def finish(self) -> int:
        steps = self.summary["steps"]
        left = [s["name"] for s in steps if "lever" in s and not s.get("unfit")
                and (s["status"] == "skipped" or s.get("cut_by_deadline"))]
        if left:
            self.summary["levers_left"] = left
            self.say(f"levers left for the next call: RNALM_GPU_LEVERS={','.join(left)} bash bench/gpu/levers.sh")
        self.summary["finished"] = _stamp(time.time())
        self.summary["ok"] = all(s["status"] == "ok" for s in steps)
        self.write_summary()
        print("\n" + table(self.summary), flush=True)
        self.log.write("\n" + table(self.summary) + "\n")
        return 0 if self.summary["ok"] else 1


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the step's process group and every descendant, also those in groups or sessions of their own
    (torchrun's ranks, coreutils timeout's child): a killed measurement is lost anyway, and a survivor would
    hold GPU memory during the next step. (SIGTERM would make a trainer save a checkpoint first.)"""
    try:
        import psutil

        descendants = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone: the group kill remains
        descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in descendants:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _read_result(path: Path):
    """A bench's JSON, or its JSON lines as a list (loader_bench appends one line per configuration)."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def _partial_trainer_steps(tmp: Path, since: float, log: Path | None = None) -> list[dict]:
    """Per-step lines of `log`, or of the newest trainer log a failed or killed step left under its TMPDIR, written
    since the step started (a warm machine keeps an earlier call's)."""
    logs = [log] if log is not None and log.exists() else sorted(tmp.glob("*/run/log.jsonl"),
                                                                  key=lambda p: p.stat().st_mtime)
    logs = [p for p in logs if p.stat().st_mtime >= since - 1]
    if not logs:
        return []
    keys = ("step", "loss", "tokens_per_s", "mfu", "step_seconds", "step_tokens", "loader_wait_s", "memory_peak_bytes")
    lines = [json.loads(x) for x in logs[-1].read_text().splitlines() if x.strip()]
    return [{k: r.get(k) for k in keys} for r in lines if "event" not in r]


# ------------------------------------------------------------------------------------------------- plans
def corpus() -> Path:
    return Path(os.environ["RNALM_SHARED_DATA"]) / "ncrna" / "ncrna_corpus.fasta.gz"


def env_step(out: Path) -> Step:
    argv = [PY, "bench/gpu/env_check.py", str(out / "env.json"), *([] if TINY else ["--require-cuda"])]
    return Step("env", argv, cap=120, min_seconds=10, essential=True)


def shards_step(work: Path) -> Step:
    return Step("shards", [PY, "dataprep/build_shards.py", "--input", str(corpus()), "--out", str(work / "shards"),
                           "--no-cluster", "--valid-fraction", "0.01", "--no-report", "--quiet"],
                cap=120, essential=True)


def session_steps(out: Path, work: Path) -> list[Step]:
    """The first call of a GPU session: issue 4 step 7 and issue 7's baseline (the trainer's defaults against the
    padded original recipe), issue 2 step 6, then as many levers as the time allows, best expected first."""
    if TINY:
        model = ["--preset", "nano", "--dim", "64", "--layers", "2", "--heads", "4", "--budget", "2048",
                 "--padded-batch", "8", "--steps", "2", "--warmup", "1", "--dtype", "fp32", "--ffn-align", "1"]
        pretrain = ["--tiny", "--steps", "3", "--warmup", "1", "--padded-batch", "8", "--padded-steps", "2",
                    "--profile"]
    else:
        # padded batch 32 (~13k positions, the memory of the 16k packed budget): 192 unpadded-to-longest
        # sequences without activation checkpointing need ~200 GiB of activations for giga
        model = ["--preset", "giga", "--dtype", "bf16", "--budget", "16384", "--padded-batch", "32",
                 "--steps", "10", "--warmup", "2", "--ffn-align", "1"]
        pretrain = [*LEVER_RUN, "--padded-batch", "192", "--padded-steps", "3", "--profile"]
    return [shards_step(work),
            Step("pretrain_bench", [PY, "bench/pretrain_bench.py", *pretrain, "--shards", str(work / "shards"),
                                    "--corpus", str(corpus()), "--out", str(out / "pretrain_bench.json")],
                 cap=300, min_seconds=90, result=out / "pretrain_bench.json",
                 oom_retry=["--set", "model.activation_checkpointing=true"], trainer_run=True),
            Step("model_bench", [PY, "bench/model_bench.py", *model, "--corpus", str(corpus()),
                                 "--out", str(out / "model_bench.json")], cap=150, result=out / "model_bench.json"),
            *[lever_step(name, work) for name in wanted_levers()]]


# name -> trainer overrides, largest expected gain first (predictions: BENCHMARKS.md, GPU session runbook).
# Sized for the H200 (139 GiB): 48k and 64k tokens fit without activation checkpointing there; budget48k_ac9 is the
# H100 (80 GB) case, where the 64k levers are skipped (LEVER_MIN_GPU_GIB).
LEVERS: dict[str, list[str]] = {
    "baseline": [],
    "compile": ["model.compile=true"],
    "zero2_compile": ["train.ds_config=ds_configs/zero2.json", "model.compile=true"],
    "compile_budget64k": ["model.compile=true", "data.token_budget=65536"],
    # the baseline's attention (torch_flash, with the recipe's dropout 0.1) against torch's varlen_attn without it
    "attn_no_dropout": ["model.attention_backend=torch_varlen"],
    # the original's batch (1344 sequences, ~164k tokens) on one GPU: 5 micro-batches of 32k per optimizer step
    "accum5": ["train.grad_accum=5"],
    "zero2": ["train.ds_config=ds_configs/zero2.json"],
    "ffn_align1": ["model.ffn_align=1"],
    "zero3_persist": ["train.ds_overrides={zero_optimization: {stage3_param_persistence_threshold: 1000000000}}"],
    "budget64k": ["data.token_budget=65536"],
    "budget16k": ["data.token_budget=16384"],
    "adamw_unfused": ["optim.adamw=torch"],
    "budget48k_ac9": ["data.token_budget=49152", "model.activation_checkpointing=9"],
    "zero3_buckets": ["train.ds_overrides={zero_optimization: {reduce_bucket_size: 200000000, "
                      "stage3_prefetch_bucket_size: 200000000}}"],
    "adamw_deepspeed": ["optim.adamw=deepspeed"],
}
# peak GPU memory measured on the H200 (2026-12-04): 110.2 GiB at 64k tokens, so not on an 80 GB H100
LEVER_MIN_GPU_GIB = {"compile_budget64k": 120.0, "budget64k": 120.0}
# seconds a lever needs, start-up included (H200, 2026-12-04: eager levers 49-69 s; 5 micro-batches a step take
# longer); with less left the next lever runs instead, and one cut short by the deadline is left for the next call
LEVER_MIN_SECONDS = {"accum5": 110.0}
DEFAULT_LEVERS = [k for k in LEVERS if k != "baseline"]   # the baseline is the session plan's packed run
# also profiled (3 steps after the timed ones, pretrain_bench --profile), as the baseline is: where the time went
PROFILED_LEVERS = {"compile"}
LEVER_RUN = ["--preset", "giga", "--steps", "10", "--warmup", "3"]   # pretrain_bench's packed run, every lever


def wanted_levers() -> list[str]:
    """RNALM_GPU_LEVERS: unset, every lever; empty (a first call that left none), none."""
    wanted = os.environ.get("RNALM_GPU_LEVERS")
    names = DEFAULT_LEVERS if wanted is None else [n.strip() for n in wanted.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"runner: unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    return names


def lever_overrides(name: str) -> list[str]:
    sets = LEVERS[name]
    if TINY:  # budgets / 16 (2048 = the tiny config's), the CPU's attention, the tiny config's ZeRO-3 override kept
        sets = [f"data.token_budget={int(s.split('=')[1]) // 16}" if s.startswith("data.token_budget=")
                else "model.attention_backend=sdpa" if s.startswith("model.attention_backend=") else s
                for s in sets]
    return sets


def lever_step(name: str, work: Path) -> Step:
    """One pretrain_bench packed run with the lever's overrides, on the shards of shards_step."""
    sets = [a for s in lever_overrides(name) for a in ("--set", s)]
    # compiling giga (~1-2 min) or JIT-building DeepSpeed's FusedAdam (~1 min) comes before the first step
    slow_start = {"model.compile=true", "optim.adamw=deepspeed"} & set(LEVERS[name])
    result = work / "levers" / f"{name}.json"
    common = [*(["--tiny", "--steps", "2", "--warmup", "1"] if TINY else LEVER_RUN),
              *(["--profile"] if name in PROFILED_LEVERS else [])]
    return Step(name, [PY, "bench/pretrain_bench.py", *common, "--skip-padded", "--shards", str(work / "shards"),
                       "--corpus", str(corpus()), *sets, "--out", str(result)],
                # with less room than min_seconds, a lever after it runs instead
                cap=240 if slow_start else 150, result=result,
                min_seconds=10 if TINY else 150 if slow_start else LEVER_MIN_SECONDS.get(name, 75),
                meta={"lever": LEVERS[name]}, oom_retry=["--set", "model.activation_checkpointing=true"],
                min_gpu_gib=0.0 if TINY else LEVER_MIN_GPU_GIB.get(name, 0.0), trainer_run=True)


def lever_steps(out: Path, work: Path) -> list[Step]:
    """The second call: the data loader alone on the GPU node's CPUs, the activation memory of a giga block and
    matmul operand alignment (~40 s together, measured nowhere else), then the levers the first call left
    (RNALM_GPU_LEVERS)."""
    steps = [shards_step(work)]
    loader = (["--workers", "0", "1", "--token-budget", "2048", "--batches", "20", "--warmup", "2"] if TINY else
              ["--workers", "0", "1", "4", "--token-budget", "32768", "--batches", "2000", "--warmup", "20"])
    steps.append(Step("loader", [PY, "bench/loader_bench.py", "--shards", str(work / "shards"), *loader,
                                 "--out", str(work / "loader.jsonl")], cap=90, result=work / "loader.jsonl"))
    memory = (["--preset", "nano", "--dtype", "fp32", "--tokens", "256", "--budget", "2048"] if TINY else
              ["--preset", "giga", "--dtype", "bf16", "--budget", "16384", "32768", "65536"])
    steps.append(Step("activation_memory", [PY, "bench/activation_memory.py", *memory,
                                            "--out", str(work / "activation_memory.json")],
                      cap=60, min_seconds=15, result=work / "activation_memory.json"))
    config = "pretrain/configs/tiny_cpu.yaml" if TINY else "pretrain/configs/giga.yaml"
    steps.append(Step("gemm_alignment", [PY, "bench/gemm_alignment.py", "--config", config, "--set",
                                         "model.num_layers=2", "--tokens", "4096",
                                         "--out", str(work / "gemm_alignment.json")],
                      cap=60, min_seconds=15, result=work / "gemm_alignment.json"))
    return steps + [lever_step(name, work) for name in wanted_levers()]


def e2e_steps(out: Path, work: Path, left: float) -> list[Step]:
    if TINY:
        budgets = ["--tiny", "--pretrain-seconds", "60", "--ft-seconds", "20"]
    else:  # what is left after start-up, minus conversion, RNAfold scoring and the table (~90 s)
        pretrain = max(60, min(270, int(left - RESERVE_S - 60 - 150 - 90)))
        budgets = ["--pretrain-seconds", str(pretrain), "--ft-seconds", "150"]
    return [Step("e2e", [PY, "bench/finetune_gpu_e2e.py", "--stage", "all", "--work", str(work / "e2e"),
                         *budgets, "--export", str(out)], cap=600, min_seconds=120 if not TINY else 10,
                 result=out / "ss_pretrained_results.json", trainer_log=work / "e2e" / "pretrain" / "log.jsonl")]


# ------------------------------------------------------------------------------------------------ report
def table(summary: dict) -> str:
    rows = ["| step | status | s | real tok/s | MFU | peak GiB | notes |", "|---|---|---:|---:|---:|---:|---|"]
    for s in summary["steps"]:
        r = s.get("result") or {}
        cells = {"tok": "", "mfu": "", "mem": ""}
        notes = [s.get("reason", "")]
        if "packed" in r:
            p = r["packed"]
            cells.update(tok=f"{p['real_tokens_per_s']:,.0f}", mfu=f"{p['mfu']:.1%}",
                         mem=f"{p.get('peak_memory_gib', float('nan')):.1f}")
            if "phase_seconds_per_step" in p:
                ph = p["phase_seconds_per_step"]
                split = "/".join(f"{ph[k]:.3f}" for k in ("forward", "backward", "optimizer"))
                host = "/".join(f"{ph[k + '_host']:.3f}" for k in ("forward", "backward", "optimizer"))
                notes.append(f"fwd/bwd/opt {split} of {p['mean_step_seconds']:.3f} s (host {host})")
            if "packed_over_padded" in r:
                notes.append(f"padded {r['padded']['real_tokens_per_s']:,.0f} tok/s (x{r['packed_over_padded']:.1f})")
            if "padded_error" in r:
                notes.append(f"padded baseline failed: {r['padded_error'][:80]}")
            notes += [f"FFN at ffn_align {key[16:]}: x{r[key]['vs_packed']:.2f} packed"
                      for key in r if key.startswith("packed_ffn_align")]
            if "agreement" in r:
                a = r["agreement"]
                notes.append(f"packed vs padded rel. err logits {a['packed_vs_padded_logits']:.1e}, "
                             f"grads {a['packed_vs_padded_grads']:.1e}")
                notes += [f"{name} vs {a['packed_backend']} logits {o['vs_packed_logits']:.1e}, grads "
                          f"{o['vs_packed_grads']:.1e}" for name, o in a.get("other_backends", {}).items()]
            notes += [f"{name} dropout {d['p']}: mean {d['mean']:.4f}, std {d['std']:.3f}, same seed same mask "
                      f"{d['same_seed_same_mask']}, mask replayed (rel. err) {d['mask_replay_rel_err']:.1e}"
                      for name, d in r.get("attention_dropout", {}).items()]
            if "profile" in p:
                prof = p["profile"]
                notes.append(f"profiled: GPU busy {prof['gpu_busy_fraction']:.0%} of {prof['wall_s']:.2f} s")
                notes.append(", ".join(f"{kind} {x:.2f} s" for kind, x in prof["kernel_s_by_kind"].items()))
        if "bytes_per_token_per_block" in r:  # activation_memory
            notes = [f"{r['bytes_per_token_per_block'] / 1e3:.1f} KB per token per block",
                     *(f"{b['budget']}: {b['activations_gib']:.1f} GiB, checkpoint {b.get('checkpointed_blocks')}"
                       for b in r["budgets"])]
        if "misaligned_operands" in r:  # gemm_alignment
            notes = [f"{r['misaligned_operands']} of {r['operands']} matmul operands misaligned"]
        if isinstance(r, list):  # loader_bench: one row per worker count
            notes = [f"{x['workers']} workers {x['tokens_per_s']:,} tok/s (x{x['x_trainer_target']} of 200k)"
                     for x in r]
        if s["status"] not in ("ok", "skipped"):
            notes.append("OOM" if s.get("oom") else (s.get("tail") or [""])[-1][:80])
        if "first_try" in s:
            notes.append("after an OOM retry with activation checkpointing")
        text = "; ".join(filter(None, notes)).replace("|", "/")
        rows.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {cells['tok']} | {cells['mfu']} | "
                    f"{cells['mem']} | {text} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("session", "levers", "e2e"):
        print("usage: runner.py session|levers|e2e", file=sys.stderr)
        return 2
    if not os.environ.get("OUT"):
        print("runner: OUT is not set (the device tool sets it; elsewhere export OUT=DIR)", file=sys.stderr)
        return 2
    wanted_levers()   # an unknown lever stops the call before any step
    out = Path(os.environ["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("RNALM_GPU_WORK", "/tmp/rnalm_gpu"))
    os.environ.setdefault("RNALM_SHARED_DATA", str(REPO / "shared" / "data"))
    if not corpus().exists():
        print(f"runner: {corpus()} not found: run bench/gpu/prepare.sh here and carry shared", file=sys.stderr)
        return 2
    plan = Plan(argv[0], out, work, float(os.environ.get("RNALM_GPU_T0", time.time())),
                min(float(os.environ.get("RNALM_GPU_BUDGET_S", MAX_BUDGET_S)), MAX_BUDGET_S))
    (work / "levers").mkdir(parents=True, exist_ok=True)
    plans = {"session": lambda: session_steps(out, work), "levers": lambda: lever_steps(out, work),
             "e2e": lambda: e2e_steps(out, work, plan.left())}
    steps = [env_step(out)]
    while steps:
        step = steps.pop(0)
        record = plan.run(step)
        if step.essential and record["status"] != "ok":
            plan.say(f"{step.name} failed: stopping here (see {out / 'session.log'})")
            plan.finish()
            return 2
        if step.name == "env":  # the plan's steps made now: e2e's budgets are what is left after env
            steps = plans[argv[0]]()
    return plan.finish()


if __name__ == "__main__":
    sys.exit(main())
