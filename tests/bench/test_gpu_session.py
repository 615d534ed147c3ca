"""bench/gpu/{session,levers,e2e}.sh end to end on CPU (RNALM_GPU_SESSION_TINY=1: tiny models, few steps), with a
fake $OUT: the plans run the real benches, write their results after every step, stop at their time budget
without leaving processes behind, and fail fast with a clear message."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu.runner import LEVERS, PROFILED_LEVERS, lever_step
from pretrain.config import PretrainConfig, deepspeed_config
from rnalm.configfile import from_cli, to_dict

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def run_plan(plan: str, out: Path, work: Path, data: Path, tiny: bool = True, **env: str):
    full_env = dict(os.environ, OUT=str(out), RNALM_GPU_WORK=str(work), RNALM_GPU_PYTHON=sys.executable,
                    RNALM_GPU_SKIP_INSTALL="1", RNALM_SHARED_DATA=str(data), OMP_NUM_THREADS="1", **env)
    full_env.pop("RNALM_GPU_SESSION_TINY", None)
    if tiny:
        full_env["RNALM_GPU_SESSION_TINY"] = "1"
    return subprocess.run(["bash", f"bench/gpu/{plan}.sh"], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=280)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_session_plan_measures_pretrain_and_model_benches_then_levers(shared_data, tmp_path):
    out = tmp_path / "out"
    proc = run_plan("session", out, tmp_path / "work", shared_data, RNALM_GPU_LEVERS="zero2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    s = summary(out)
    steps = {x["name"]: x for x in s["steps"]}
    assert s["plan"] == "session" and s["ok"] and "levers_left" not in s
    assert list(steps) == ["env", "shards", "pretrain_bench", "model_bench", "zero2"]
    env = json.loads((out / "env.json").read_text())
    assert {"torch", "deepspeed", "webdataset", "zstandard", "rnalm"} <= set(env["modules"]) and not env["missing"]
    assert env["cpu_model"] and 0 < env["host_op_us"] < 1000  # to scale host time measured here to the GPU's host
    model = steps["model_bench"]["result"]
    assert model["agreement"]["packed_vs_padded_logits"] < 1e-5 and model["packed"]["real_tokens_per_s"] > 0
    pretrain = steps["pretrain_bench"]["result"]
    assert pretrain["packed"]["steps"] == 3 and pretrain["padded"]["batch"] == 8
    assert f"--shards {tmp_path / 'work' / 'shards'}" in pretrain["command"]     # the shards built once
    profile = pretrain["packed"]["profile"]  # 3 more steps after the timed 2-4, kept out of their numbers
    assert profile["steps"] == [5, 7] and profile["wall_s"] > 0 and profile["top_cpu_ops"] and profile["ops_table"]
    zero2 = steps["zero2"]["result"]
    assert "--set train.ds_config=ds_configs/zero2.json" in zero2["command"] and "padded" not in zero2
    assert json.loads((out / "pretrain_bench.json").read_text()) == pretrain
    log = (out / "session.log").read_text()
    assert "pretrain_bench | " in log and "| pretrain_bench | ok |" in log     # child output + final table
    assert "sdpa dropout 0.1: mean " in log and "mask replayed" in log  # model_bench's dropout check in the table
    assert len(list(out.iterdir())) <= 8        # the device brings back at most 8 files


def test_the_table_shows_every_attention_kernel_checked():
    from bench.gpu.runner import table

    result = {"packed": {"real_tokens_per_s": 1000.0, "mfu": 0.2},
              "agreement": {"packed_backend": "torch_varlen", "packed_vs_padded_logits": 1e-3,
                            "packed_vs_padded_grads": 2e-3,
                            "other_backends": {"torch_flash": {"vs_packed_logits": 4e-4, "vs_packed_grads": 5e-4}}},
              "attention_dropout": {"torch_flash": {"p": 0.1, "mean": 1.0012, "std": 0.052,
                                                    "same_seed_same_mask": True, "mask_replay_rel_err": 3e-4}}}
    text = table({"steps": [{"name": "model_bench", "status": "ok", "seconds": 9, "result": result}]})
    assert "torch_flash vs torch_varlen logits 4.0e-04, grads 5.0e-04" in text
    assert "torch_flash dropout 0.1: mean 1.0012, std 0.052, same seed same mask True, mask replayed (rel. err) " \
           "3.0e-04" in text


def test_levers_plan_applies_each_levers_overrides(shared_data, tmp_path):
    out = tmp_path / "out"
    proc = run_plan("levers", out, tmp_path / "work", shared_data, RNALM_GPU_LEVERS="zero2,budget48k_ac9")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = {x["name"]: x for x in summary(out)["steps"]}
    # the short one-off measurements first: the levers a first call left can fill any time after them
    assert list(steps) == ["env", "shards", "loader", "activation_memory", "gemm_alignment", "zero2", "budget48k_ac9"]
    assert [r["workers"] for r in steps["loader"]["result"]] == [0, 1]
    assert all(r["tokens_per_s"] > 0 and r["token_budget"] == 2048 for r in steps["loader"]["result"])
    zero2, budget = steps["zero2"]["result"], steps["budget48k_ac9"]["result"]
    assert "--set train.ds_config=ds_configs/zero2.json" in zero2["command"] and "padded" not in zero2
    # tiny mode scales budgets by 1/16: 49152 -> 3072 tokens
    assert "--set data.token_budget=3072 --set model.activation_checkpointing=9" in budget["command"]
    memory = steps["activation_memory"]["result"]
    assert memory["bytes_per_token_per_block"] > 0 and memory["budgets"][0]["budget"] == 2048
    assert zero2["packed"]["steps"] == 2 and budget["packed"]["real_tokens_per_s"] > 0
    alignment = steps["gemm_alignment"]["result"]
    assert alignment["gemm_calls"] > 0 and alignment["misaligned_operands"] == 0


def test_levers_plan_rejects_unknown_levers(shared_data, tmp_path):
    proc = run_plan("levers", tmp_path / "out", tmp_path / "work", shared_data, RNALM_GPU_LEVERS="zero2,warp9")
    assert proc.returncode != 0 and "unknown lever(s) ['warp9']" in proc.stderr


def leftovers(marker: Path) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if str(marker) in " ".join(p.info["cmdline"] or [])]


def test_a_step_past_its_time_is_killed_with_its_trainer_ranks_and_keeps_the_logged_steps(ncrna_fasta, tmp_path):
    """A real pretrain_bench (torchrun: the ranks run in sessions of their own) stopped by the step's timeout.
    The plan's TORCH_EXTENSIONS_DIR is its own: DeepSpeed's CPU comm op is built first (~25 s on 2 idle cores)."""
    from bench.gpu.runner import Plan, Step

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    plan = Plan("t", out, work, time.time(), budget=200)
    argv = [sys.executable, "bench/pretrain_bench.py", "--tiny", "--steps", "100000", "--warmup", "1",
            "--skip-padded", "--corpus", str(ncrna_fasta)]
    record = plan.run(Step("killed", argv, cap=90, min_seconds=1))
    assert record["status"] == "timeout" and record["seconds"] < 105
    steps = record["partial_trainer_steps"]
    assert len(steps) >= 1 and steps[0]["step"] == 1 and steps[-1]["tokens_per_s"] > 0
    time.sleep(1)
    assert not leftovers(work), "processes of the killed step still run"
    assert summary(out)["steps"][0]["status"] == "timeout"


def test_e2e_plan_within_a_short_budget_ends_cleanly(shared_data, tmp_path):
    """The tiny e2e fits 40 s only on an idle machine: either it finished and exported its results, or the
    budget stopped it; both leave a summary and no process behind."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = run_plan("e2e", out, work, shared_data, RNALM_GPU_BUDGET_S="40")
    env, e2e = summary(out)["steps"]
    assert env["status"] == "ok" and e2e["status"] in ("ok", "timeout"), e2e
    if e2e["status"] == "ok":
        assert proc.returncode == 0 and (out / "table.md").exists() and "rows" in e2e["result"]
    else:  # killed at the plan's deadline, not at its cap (its measured seconds also hold any stall of the
        log = (out / "session.log").read_text()  # machine: 52 s once on a loaded CI host, the timeout being 29)
        timeout = int(re.search(r"e2e: start \(timeout (\d+) s\)", log).group(1))
        assert proc.returncode == 1 and e2e["cut_by_deadline"] and timeout < 40
        assert f"e2e: TIMEOUT after {timeout} s" in log
    time.sleep(1)
    assert not leftovers(work)


def test_without_cuda_the_real_plan_stops_at_the_environment_check(shared_data, tmp_path):
    out = tmp_path / "out"
    proc = run_plan("session", out, tmp_path / "work", shared_data, tiny=False, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert "no CUDA device visible to torch" in proc.stdout + proc.stderr
    s = summary(out)
    assert [x["name"] for x in s["steps"]] == ["env"] and s["steps"][0]["status"] == "failed" and not s["ok"]
    assert json.loads((out / "env.json").read_text())["cuda_available"] is False


def test_fails_fast_without_out_or_data(tmp_path):
    env = dict(os.environ, RNALM_GPU_PYTHON=sys.executable, RNALM_GPU_SKIP_INSTALL="1")
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "bench/gpu/session.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "OUT is not set" in proc.stderr
    env.update(OUT=str(tmp_path / "out"), RNALM_SHARED_DATA=str(tmp_path / "nothing"))
    proc = subprocess.run(["bash", "bench/gpu/levers.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "run bench/gpu/prepare.sh" in proc.stderr


def test_a_lever_too_large_for_this_gpu_is_skipped_and_not_left_for_the_next_call(tmp_path, monkeypatch):
    """On an 80 GB H100 the 64k-token levers (110 GiB on the H200) ran out of memory, then again in their retry."""
    from bench.gpu.runner import Plan, Step

    plan = Plan("t", tmp_path, tmp_path / "work", time.time(), budget=60)
    big = Step("budget64k", [sys.executable, "-c", "pass"], cap=30, min_seconds=1, meta={"lever": []},
               min_gpu_gib=120)
    assert plan.run(big)["status"] == "ok"  # before the env step: the GPU is unknown
    (tmp_path / "env.json").write_text(json.dumps({"memory_total_gib": 79.19}))
    record = plan.run(big)
    assert record["status"] == "skipped" and record["reason"] == "needs ~120 GiB of GPU memory, this GPU has 79"
    assert plan.run(Step("zero2", [sys.executable, "-c", "pass"], cap=30, min_seconds=1))["status"] == "ok"
    plan.finish()
    assert "levers_left" not in summary(tmp_path)
    monkeypatch.setenv("RNALM_SHARED_DATA", str(tmp_path))
    assert lever_step("budget64k", tmp_path).min_gpu_gib == 120 and lever_step("zero2", tmp_path).min_gpu_gib == 0


def test_out_of_memory_is_retried_once_with_the_extra_arguments_and_a_short_budget_skips_and_names_levers_left(
        tmp_path):
    from bench.gpu.runner import Plan, Step

    plan = Plan("t", tmp_path, tmp_path / "work", time.time(), budget=60)
    script = ("import sys; ok = '--ac' in sys.argv; print('ok' if ok else 'torch.OutOfMemoryError: CUDA out of "
              "memory. Tried to allocate 2.00 GiB'); sys.exit(0 if ok else 1)")
    record = plan.run(Step("x", [sys.executable, "-c", script], cap=30, min_seconds=1, oom_retry=["--ac"]))
    assert record["status"] == "ok" and record["cmd"].endswith(" --ac")
    assert record["first_try"]["status"] == "failed" and record["first_try"]["oom"]
    skipped = plan.run(Step("y", [sys.executable, "-c", "pass"], cap=30, min_seconds=120))
    assert skipped["status"] == "skipped" and "needs 120" in skipped["reason"]
    lever = plan.run(Step("zero2", [sys.executable, "-c", "pass"], cap=30, min_seconds=120, meta={"lever": []}))
    assert lever["status"] == "skipped"
    assert plan.finish() == 1
    assert [s["status"] for s in summary(tmp_path)["steps"]] == ["ok", "skipped", "skipped"]
    assert summary(tmp_path)["levers_left"] == ["zero2"]          # the next call's RNALM_GPU_LEVERS
    assert "RNALM_GPU_LEVERS=zero2 bash bench/gpu/levers.sh" in (tmp_path / "session.log").read_text()


@pytest.mark.parametrize("tiny", [True, False])
def test_jit_built_ops_are_shared_by_the_steps_of_a_cpu_plan_and_kept_apart_on_the_gpu(tmp_path, monkeypatch, tiny):
    """A TORCH_EXTENSIONS_DIR per step made every trainer start of the CPU plans rebuild DeepSpeed's comm op
    (25-60 s): their steps timed out on a loaded machine. On the GPU a step keeps its own: a build killed with its
    step (FusedAdam's) leaves a lock that a later build would wait on."""
    import bench.gpu.runner as runner

    monkeypatch.setattr(runner, "TINY", tiny)
    plan = runner.Plan("t", tmp_path, tmp_path / "work", time.time(), budget=60)
    script = [sys.executable, "-c", "import os; print('ext', os.environ['TORCH_EXTENSIONS_DIR'])"]
    for name in ("a", "b"):
        assert plan.run(runner.Step(name, script, cap=30, min_seconds=1))["status"] == "ok"
    dirs = [line.split("ext ")[1] for line in (tmp_path / "session.log").read_text().splitlines() if "| ext " in line]
    assert len(dirs) == 2 and (dirs[0] == dirs[1]) == tiny, dirs


def test_a_lever_cut_short_by_the_deadline_is_left_for_the_next_call_and_one_past_its_cap_is_not(tmp_path):
    """A lever killed when the plan's time ran out was neither measured nor named for the second call."""
    from bench.gpu.runner import RESERVE_S, Plan, Step

    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    for name, budget, cap, left in (("compile", RESERVE_S + 3, 60, ["compile"]), ("zero2", 60, 2, None)):
        out = tmp_path / name
        out.mkdir()
        plan = Plan("t", out, tmp_path / "work", time.time(), budget=budget)
        record = plan.run(Step(name, sleep, cap=cap, min_seconds=1, meta={"lever": []}))
        assert record["status"] == "timeout" and record.get("cut_by_deadline", False) == (left is not None)
        plan.finish()
        assert summary(out).get("levers_left") == left


def test_after_two_trainer_runs_fail_alike_the_levers_left_are_skipped_for_a_second_call(tmp_path):
    """A trainer that fails at start (a bad wheel, an API the device's torch lacks) failed every lever in turn,
    ~40 s each on the H200: twelve of them are the whole call. An OOM is the lever's own and does not count."""
    from bench.gpu.runner import Plan, Step

    plan = Plan("t", tmp_path, tmp_path / "work", time.time(), budget=120)

    def trainer(name: str, script: str, lever: bool = True) -> dict:
        return plan.run(Step(name, [sys.executable, "-c", script], cap=30, min_seconds=1, trainer_run=True,
                             meta={"lever": []} if lever else {}))

    fail, oom = "raise SystemExit('ImportError: cannot import name')", "print('CUDA out of memory'); exit(1)"
    assert trainer("pretrain_bench", fail, lever=False)["status"] == "failed"
    assert trainer("compile", "pass")["status"] == "ok"                   # an ok run: the count starts again
    assert [trainer(n, s)["status"] for n, s in (("zero2", fail), ("accum5", oom), ("budget16k", fail))] == \
        ["failed", "failed", "failed"]
    assert plan.run(Step("model_bench", [sys.executable, "-c", "pass"], cap=30, min_seconds=1))["status"] == "ok"
    skipped = trainer("adamw_unfused", "pass")
    assert skipped["status"] == "skipped", skipped
    assert skipped["reason"].startswith("zero2 and budget16k failed (not out of memory or time)")
    plan.finish()
    assert summary(tmp_path)["levers_left"] == ["adamw_unfused"]


def test_a_failed_step_keeps_the_result_it_wrote_and_is_not_retried_for_an_oom_after_it(tmp_path):
    """pretrain_bench writes its packed run, then measures the padded baseline: an OOM there lost the packed
    numbers, and its retry re-ran the packed run with every block checkpointed."""
    from bench.gpu.runner import Plan, Step

    result = tmp_path / "r.json"
    result.write_text('{"stale": "a warm machine keeps the last call\'s"}')
    script = (f"import json, sys; open({str(result)!r}, 'w').write(json.dumps({{'packed': {{'argv': sys.argv}}}})); "
              "print('torch.OutOfMemoryError: CUDA out of memory'); sys.exit(1)")
    plan = Plan("t", tmp_path, tmp_path / "work", time.time(), budget=60)
    record = plan.run(Step("pretrain_bench", [sys.executable, "-c", script], cap=30, min_seconds=1, result=result,
                           oom_retry=["--ac"]))
    assert record["status"] == "failed" and record["oom"] and "first_try" not in record
    assert record["result"] == {"packed": {"argv": ["-c"]}}


def test_an_empty_lever_list_asks_for_none(monkeypatch):
    from bench.gpu.runner import DEFAULT_LEVERS, wanted_levers

    monkeypatch.delenv("RNALM_GPU_LEVERS", raising=False)
    assert wanted_levers() == DEFAULT_LEVERS
    monkeypatch.setenv("RNALM_GPU_LEVERS", "")   # a first call that left none: `levers_left` empty
    assert wanted_levers() == []


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_every_levers_overrides_make_a_valid_giga_config(lever):
    """A device minute is too dear to find a renamed config key or a refused value there: each lever's overrides
    parse, validate (DeepSpeed JSON included) and build a model config here, and change the baseline's."""
    def config(overrides):
        cfg = from_cli(PretrainConfig, ["--config", str(REPO / "pretrain/configs/giga.yaml"),
                                        "--data.shards=/somewhere", *(f"--{s}" for s in overrides)])
        cfg.validate()
        return cfg

    cfg = config(LEVERS[lever])
    assert cfg.model.build().dim == 1280 and deepspeed_config(cfg, bf16=True)["zero_optimization"]["stage"] in (2, 3)
    assert (to_dict(cfg) == to_dict(config([]))) == (lever == "baseline")


def test_the_compile_lever_is_profiled_like_the_baseline_and_the_others_are_not(tmp_path, monkeypatch):
    """The compiled step's kernels and GPU busy share decide what comes after compile; profiling every lever would
    cost device time that the remaining levers need."""
    monkeypatch.setenv("RNALM_SHARED_DATA", str(tmp_path))
    assert PROFILED_LEVERS == {"compile"}
    assert "--profile" in lever_step("compile", tmp_path).argv
    assert "--profile" not in lever_step("zero2", tmp_path).argv


def test_the_final_table_gives_each_steps_numbers_and_notes():
    from bench.gpu.runner import table

    packed = {"real_tokens_per_s": 49083.2, "mfu": 0.198, "peak_memory_gib": 61.1, "mean_step_seconds": 0.665,
              "phase_seconds_per_step": {"forward": 0.2, "backward": 0.4, "optimizer": 0.05, "forward_host": 0.1,
                                         "backward_host": 0.05, "optimizer_host": 0.04},
              "profile": {"gpu_busy_fraction": 0.9, "wall_s": 2.0, "kernel_s_by_kind": {"matmul": 1.2, "other": 0.5}}}
    steps = [{"name": "pretrain_bench", "status": "ok", "seconds": 200,
              "result": {"packed": packed, "padded": {"real_tokens_per_s": 4270.0}, "packed_over_padded": 11.5}},
             {"name": "activation_memory", "status": "ok", "seconds": 30,
              "result": {"bytes_per_token_per_block": 49200, "budgets": [{"budget": 16384, "activations_gib": 24.8}]}},
             {"name": "budget64k", "status": "failed", "seconds": 40, "oom": True, "first_try": {}, "result": None}]
    rows = table({"steps": steps}).splitlines()
    assert rows[2] == ("| pretrain_bench | ok | 200 | 49,083 | 19.8% | 61.1 | fwd/bwd/opt 0.200/0.400/0.050 of 0.665 s "
                       "(host 0.100/0.050/0.040); padded 4,270 tok/s (x11.5); profiled: GPU busy 90% of 2.00 s; "
                       "matmul 1.20 s, other 0.50 s |")
    assert rows[3] == ("| activation_memory | ok | 30 |  |  |  | 49.2 KB per token per block; 16384: 24.8 GiB, "
                       "checkpoint None |")
    assert rows[4] == "| budget64k | failed | 40 |  |  |  | OOM; after an OOM retry with activation checkpointing |"


def test_tiny_mode_runs_an_attention_lever_on_the_cpus_backend(monkeypatch):
    """The CUDA backends do not exist on the CPU, where rehearse.sh runs every lever in tiny mode."""
    from bench.gpu import runner

    assert runner.lever_overrides("attn_no_dropout") == ["model.attention_backend=torch_varlen"]
    monkeypatch.setattr(runner, "TINY", True)
    assert runner.lever_overrides("attn_no_dropout") == ["model.attention_backend=sdpa"]
    assert runner.lever_overrides("budget16k") == ["data.token_budget=1024"]


def test_a_trainer_log_from_before_the_step_is_not_taken_for_its_own(tmp_path):
    """On a warm machine a lever rerun in call 2 that died before logging reported call 1's steps as its own."""
    from bench.gpu.runner import _partial_trainer_steps

    log = tmp_path / "tmpdir1" / "run" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps({"event": "done"}) + "\n")
    os.utime(log, (time.time() - 300, time.time() - 300))
    assert _partial_trainer_steps(tmp_path, since=time.time()) == []
    os.utime(log)
    assert [r["step"] for r in _partial_trainer_steps(tmp_path, since=time.time() - 5)] == [1]
