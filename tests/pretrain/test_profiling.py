"""train.profile_at: a window of steps under torch.profiler, summarised in log.jsonl and written to out_dir/profile;
and the always-on phase clock of every step."""
import gzip
import json
from types import SimpleNamespace

import pytest
import torch

from pretrain.profiling import PhaseClock, device_kernels, kernel_kind, summarise_kernels

from .trainer_runs import events, read_log, run_trainer, step_lines


def test_kernel_summary_counts_overlapping_streams_once_and_sorts_kernels_by_kind():
    kernels = [("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 400), ("ncclDevKernel_ReduceScatter_Sum_bf16", 300, 600),
               ("flash_fwd_kernel", 700, 800), ("multi_tensor_apply_kernel<AdamFunctor>", 800, 900),
               ("vectorized_elementwise_kernel", 950, 1000), ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopB_TNT", 1000, 1100)]
    s = summarise_kernels(kernels[::-1], wall_s=2000e-6)       # in any order (the profiler's is by stream)
    assert s["gpu_busy_s"] == pytest.approx(950e-6)             # 0-600 (two streams), 700-900, 950-1100
    assert s["gpu_busy_fraction"] == pytest.approx(0.475)
    assert s["kernel_s_by_kind"] == pytest.approx({"matmul": 500e-6, "communication": 300e-6, "attention": 100e-6,
                                                   "optimizer": 100e-6, "elementwise": 50e-6})
    assert s["top_kernels"][0] == {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "s": pytest.approx(400e-6), "calls": 1}
    assert kernel_kind("cutlass_80_wmma_tensorop_bf16_s161616gemm") == "matmul"
    small_first = summarise_kernels([("elementwise_kernel", 0, 10), ("gemm", 10, 100)], wall_s=1e-3)
    assert list(small_first["kernel_s_by_kind"]) == ["matmul", "elementwise"]           # the most time first
    assert [k["name"] for k in small_first["top_kernels"]] == ["gemm", "elementwise_kernel"]


@pytest.mark.parametrize("name, kind", [
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copy"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<c10::BFloat16, unsigned int, 1, 128, 1>", "copy"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "elementwise"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int>", "elementwise"),
    ("triton_per_fused_add_native_layer_norm_0", "compiled"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", "attention"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::(anonymous namespace)::compute_grad_weight<c10::BFloat16, long>", "other"),
])
def test_kernels_are_sorted_into_kinds_by_name(name, kind):
    """Eager pointwise/norm kernels and copies are what a profile must tell apart from "other": the memory-bound
    work that compiling fuses, against the casts and gathers that ZeRO adds."""
    assert kernel_kind(name) == kind


def test_the_gpus_copies_of_user_annotations_are_not_kernels():
    """torch 2.11 gives the optimizer's `Optimizer.step#AdamW.step` span and each compiled graph's call a CUDA copy:
    counted as kernels they filled the gaps between the kernels inside them and doubled the optimizer's time."""
    from torch.autograd import DeviceType

    def event(name, start, end, device=DeviceType.CUDA, annotation=False):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               is_user_annotation=annotation)

    events = [event("Optimizer.step#AdamW.step", 0, 1000, annotation=True),
              event("multi_tensor_apply_kernel<AdamFunctor>", 100, 200), event("aten::addmm", 0, 50, DeviceType.CPU),
              event("## Call CompiledFxGraph f1 ##", 1000, 2000, annotation=True), event("triton_poi_fused_0", 1200, 1300)]
    kernels = device_kernels(events)
    assert [k[0] for k in kernels] == ["multi_tensor_apply_kernel<AdamFunctor>", "triton_poi_fused_0"]
    assert summarise_kernels(kernels, wall_s=2000e-6)["gpu_busy_s"] == pytest.approx(200e-6)


def test_profile_at_profiles_a_window_of_the_real_trainer_and_logs_where_the_time_went(pretrain_shards, tmp_path):
    """A run that ends inside the window (steps 2-4 asked, 3 run) still writes its profile."""
    out = tmp_path / "run"
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=3", "--train.profile_at=2", nproc=1)
    records = read_log(out)
    assert len(step_lines(records)) == 3
    [profile] = events(records, "profile")
    assert profile["steps"] == [2, 3] and profile["wall_s"] > 0 and profile["gpu_busy_fraction"] == 0
    ops = {op["name"] for op in profile["top_cpu_ops"]}
    assert ops & {"aten::addmm", "aten::mm", "aten::bmm"}, ops
    assert "profiled steps 2-3" in proc.stderr
    with gzip.open(out / "profile" / "trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    assert "Self CPU" in (out / "profile" / "ops.txt").read_text()


def test_a_profile_that_cannot_be_written_is_a_warning_and_the_run_goes_on(pretrain_shards, tmp_path):
    """A failing profiler stopped the trainer: in pretrain_bench that lost the run's own numbers and its padded
    baseline (the profiled steps run after the timed ones, before anything is written)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "profile").write_text("a file where the profile's folder goes")
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=4", "--train.profile_at=2", nproc=1)
    records = read_log(out)
    assert len(step_lines(records)) == 4 and events(records, "done")
    [failed] = events(records, "profile_failed")
    assert failed["steps"] == [2, 4] and "FileExistsError" in failed["error"] and not events(records, "profile")
    assert "warning: profiling steps 2-4 failed, training goes on without it" in proc.stderr


def test_a_profiler_that_cannot_start_reports_why_at_the_windows_end(monkeypatch, tmp_path):
    import pretrain.profiling as profiling

    def broken(**kwargs):
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr(profiling, "profile", broken)
    prof = profiling.StepProfiler(2, tmp_path / "profile", torch.device("cpu"))
    prof.before_step(2)
    assert prof.after_step(2) is None and prof.after_step(3) is None
    prof.before_step(4)
    assert prof.after_step(4) == {"steps": [2, 4], "error": "RuntimeError: CUPTI unavailable"}
    assert prof.finish() is None and not (tmp_path / "profile").exists()


def test_a_device_error_at_the_windows_end_is_the_runs_and_not_a_profiler_warning(monkeypatch, tmp_path):
    import pretrain.profiling as profiling

    prof = profiling.StepProfiler(1, tmp_path / "profile", torch.device("cpu"))
    prof.before_step(1)
    monkeypatch.setattr(prof, "_sync", lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: illegal address")))
    with pytest.raises(RuntimeError, match="illegal address"):
        prof.finish()
    assert not torch.autograd.profiler._is_profiler_enabled


def test_profile_at_must_not_be_negative(pretrain_shards, tmp_path):
    proc = run_trainer(pretrain_shards, tmp_path / "run", "--train.profile_at=-1", nproc=1, expect_rc=None)
    assert proc.returncode != 0 and "train.profile_at must be >= 0" in proc.stderr


def test_a_resume_past_profile_at_profiles_its_first_steps(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    run_trainer(pretrain_shards, out, "--train.max_steps=5", "--train.stop_after=2", nproc=1)
    run_trainer(pretrain_shards, out, "--train.max_steps=5", "--train.profile_at=1", nproc=1)
    [profile] = events(read_log(out), "profile")
    assert profile["steps"] == [3, 5]


def test_the_phase_clock_sums_each_phase_over_micro_batches_and_leaves_out_the_time_between_them(monkeypatch):
    import pretrain.profiling

    now = [100.0]  # a clock of its own: real sleeps on a loaded machine overran the bounds

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(pretrain.profiling, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock = PhaseClock(torch.device("cpu"))
    for _ in range(2):  # two micro-batches
        clock.start()
        sleep(0.02)
        clock.mark("forward")
        sleep(0.01)
        clock.mark("backward")
        sleep(0.5)  # e.g. a sync and the next batch's copy: in no phase
    got = clock.seconds()
    assert set(got) == {"forward", "backward", "forward_host", "backward_host"}
    assert got["forward"] == pytest.approx(0.04) and got["backward"] == pytest.approx(0.02), got
    assert (got["forward_host"], got["backward_host"]) == (got["forward"], got["backward"])  # a CPU runs as called
    assert clock.seconds() == {}  # read once: the next step starts from nothing
