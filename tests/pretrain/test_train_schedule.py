"""Warm-up + cosine LR schedule (RiNALMo defaults) and the DeepSpeed config the trainer builds."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import OptimConfig, PretrainConfig, deepspeed_config
from pretrain.schedule import build_scheduler, set_schedule, warmup_cosine
from rnalm.configfile import changed_settings, load, to_dict

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_original_recipe():
    s = warmup_cosine(OptimConfig(), max_steps=76_000)
    assert s.lr(0) == pytest.approx(1e-7)
    assert s.lr(1000) == pytest.approx(1e-7 + (5e-5 - 1e-7) / 2)
    assert s.lr(2000) == pytest.approx(5e-5)
    mid = 2000 + (76_000 - 2000) // 2
    assert s.lr(mid) == pytest.approx((5e-5 + 1e-5) / 2)
    assert s.lr(76_000) == pytest.approx(1e-5) and s.lr(90_000) == pytest.approx(1e-5)
    lrs = [s.lr(i) for i in range(2000, 76_001, 500)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    o = OptimConfig()
    assert (o.weight_decay, o.betas, o.eps, o.grad_clip) == (0.01, (0.9, 0.999), 1e-8, 1.0)


def test_scheduler_drives_the_optimizer_and_pickles_its_state():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, min_lr=1e-4, warmup_start_lr=0.0, warmup_steps=4,
                                             decay_steps=4), max_steps=100)
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[6] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert seen[8] == pytest.approx(1e-4)
    state = sched.state_dict()
    assert state["last_epoch"] == 9


def test_a_resumed_scheduler_follows_this_runs_config_not_the_saved_one():
    def scheduler(lr, max_steps):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        return build_scheduler(opt, OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=2), max_steps=max_steps)

    old = scheduler(3e-3, 8)
    for _ in range(8):
        old.optimizer.step()
        old.step()
    resumed = scheduler(1e-3, 20)
    resumed.load_state_dict(old.state_dict())  # what DeepSpeed's load_checkpoint does: the old schedule is back
    assert resumed.optimizer.param_groups[0]["lr"] != pytest.approx(warmup_cosine(OptimConfig(
        lr=1e-3, min_lr=1e-4, warmup_steps=2), 20).lr(8))
    new_cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)
    set_schedule(resumed, new_cfg, 20)
    assert resumed.get_last_lr() == [resumed.optimizer.param_groups[0]["lr"]]  # not the old run's, until a step
    for step in range(8, 12):
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine(new_cfg, 20).lr(step))
        resumed.optimizer.step()
        resumed.step()
    cfg = PretrainConfig(optim=new_cfg)
    cfg.train.max_steps = 20
    saved = to_dict(PretrainConfig(optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2)))
    saved["train"]["max_steps"] = 8
    del saved["data"]["seed"]  # a setting the version that saved did not have is no change
    saved["data"]["retired_option"] = 1  # nor one it had and this version has not
    saved["train"]["ds_overrides"] = {"communication_data_type": "bf16"}   # a key dropped from a dict setting is one
    assert changed_settings(saved, to_dict(cfg)) == {"optim.lr": (3e-3, 1e-3), "optim.min_lr": (3e-4, 1e-4),
                                                     "train.max_steps": (8, 20),
                                                     "train.ds_overrides": ({"communication_data_type": "bf16"}, {})}


@pytest.mark.parametrize("override", ["train.log_every=0", "train.stop_after=0", "train.valid_every=-1",
                                      "train.valid_max_records=-1", "checkpoint.keep=0", "checkpoint.every=-1",
                                      "optim.lr=0", "optim.min_lr=1", "optim.warmup_steps=-1", "optim.decay_steps=0",
                                      "metrics.peak_flops=0", "train.seed=-1", "data.seed=-1",
                                      "train.grad_accum=0", "optim.warmup_start_lr=-1e-9",
                                      "metrics.final_scrape_s=-1", "train.inject_nonfinite_micro=1",
                                      "train.inject_nonfinite_micro=-2"])  # (tiny_cpu: train.grad_accum 1)
def test_nonsense_values_are_refused_before_the_run_starts(override):
    """By the config's load (a section's own checks: 'data: seed ...') or by validate ('train.seed ...')."""
    with pytest.raises(ValueError, match=override.split("=")[0].replace(".", r"(\.|: )")):
        load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["data.shards=/somewhere", override]).validate()


def test_settings_that_failed_later_in_a_traceback_are_refused_by_validate(tmp_path):
    """A missing DeepSpeed JSON, an out_dir that is a file (or under one), a port past 65535: each was a traceback
    from the start-up (ValueError, FileExistsError, NotADirectoryError, OverflowError), exit 1."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for override, said in ((f"train.ds_config={tmp_path / 'nope.json'}", "cannot read DeepSpeed config"),
                           (f"train.out_dir={a_file}", f"train.out_dir={a_file}: {a_file} is a file, not a directory"),
                           (f"train.out_dir={a_file / 'sub'}", f"{a_file} is a file, not a directory"),
                           ("metrics.port_base=99999", "metrics.port_base must be 0 (free ports) or a port up to"),
                           ("metrics.port_base=-5", "metrics.port_base must be 0"),
                           (f"train.init_weights={tmp_path / 'gone.safetensors'}",
                            f"train.init_weights: {tmp_path / 'gone.safetensors'} does not exist")):
        with pytest.raises(ValueError, match=re.escape(said)):
            load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["data.shards=/somewhere", override]).validate()


def test_precision_auto_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    from pretrain.train import _use_bf16

    cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["train.precision=auto"])
    assert not _use_bf16(cfg, torch.device("cpu")) and _use_bf16(cfg, torch.device("cuda", 0))
    for precision, bf16 in (("bf16", True), ("fp32", False)):
        cfg.train.precision = precision
        assert _use_bf16(cfg, torch.device("cpu")) == _use_bf16(cfg, torch.device("cuda", 0)) == bf16


def test_deepspeed_config_owns_batch_precision_and_clipping(tmp_path):
    cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["train.grad_accum=3", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, bf16=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0   # from ds_overrides
    assert ds["zero_optimization"]["overlap_comm"] is True                     # from ds_configs/zero3.json
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"], ds["bf16"]) == (3, 0.5, {"enabled": True})
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "gradient_clipping": 2.0}')
    cfg.train.ds_config = str(bad)
    with pytest.raises(ValueError, match="gradient_clipping.*set by the trainer"):
        deepspeed_config(cfg, bf16=False)
    bad.write_text('{"fp16": {"enabled": true}}')   # the trainer's precision is train.precision alone
    with pytest.raises(ValueError, match=re.escape("keys ['fp16'] are set by the trainer")):
        deepspeed_config(cfg, bf16=False)


def test_a_relative_ds_config_is_found_from_the_working_directory_first(tmp_path, monkeypatch):
    """A run's own ds_configs/zero3.json beside its config wins over the repository's file of that name."""
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3.json").write_text('{"zero_optimization": {"stage": 2}}')
    cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["train.ds_config=ds_configs/zero3.json"])
    assert deepspeed_config(cfg, bf16=False)["zero_optimization"]["stage"] == 3   # the repository's
    monkeypatch.chdir(tmp_path)
    assert deepspeed_config(cfg, bf16=False)["zero_optimization"]["stage"] == 2


def test_a_communication_dtype_the_json_sets_is_kept():
    cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["train.ds_overrides={communication_data_type: bf16}"])
    assert deepspeed_config(cfg, bf16=True)["communication_data_type"] == "bf16"
    assert "communication_data_type" not in deepspeed_config(cfg.__class__(), bf16=False)


@pytest.mark.parametrize("name", ["tiny_cpu", "nano", "micro", "mega", "giga"])
def test_every_shipped_config_loads_and_validates(name):
    cfg = load(PretrainConfig, f"pretrain/configs/{name}.yaml", ["data.shards=/somewhere"])
    cfg.validate()
    assert cfg.model.build().name == ("nano-custom" if name == "tiny_cpu" else name)
    for ds, stage in (("zero3", 3), ("zero2", 2), ("zero3_offload", 3)):
        cfg.train.ds_config = f"ds_configs/{ds}.json"
        assert deepspeed_config(cfg, bf16=True)["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize(("value", "blocks"), [("true", 33), ("false", 0), ("12", 12)])
def test_activation_checkpointing_override_takes_a_bool_or_a_block_count(value, blocks):
    cfg = load(PretrainConfig, "pretrain/configs/giga.yaml",
               ["data.shards=/somewhere", f"model.activation_checkpointing={value}"])
    assert cfg.model.build().checkpointed_blocks == blocks


def test_config_values_for_shell_scripts(tmp_path, capsys):
    from pretrain.config import main

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("metrics: {enabled: false, port_base: 9700}\n")
    main([str(yaml_file), "metrics.enabled", "metrics.port_base"])
    assert capsys.readouterr().out.split() == ["false", "9700"]  # what pretrain.sh's targets follow
    main([str(yaml_file), "--metrics.enabled=true", "--metrics.port_base=9800", "metrics.enabled", "metrics.port_base"])
    assert capsys.readouterr().out.split() == ["true", "9800"]
    with pytest.raises(SystemExit, match="no attribute 'nope'"):
        main([str(yaml_file), "metrics.nope"])


def test_gpu_presets_share_one_global_batch_and_the_original_step_count():
    """The original took 1344 sequences per step for 6 epochs of ~17M clusters (~76k steps) at every size; a step
    here is data.token_budget x train.grad_accum tokens per rank, so the presets must agree on it (micro and nano
    had twice giga's, a silently doubled batch) and docs/pretrain.md's sequences-per-step arithmetic holds."""
    per_rank = {}
    for name in ("nano", "micro", "mega", "giga"):
        cfg = load(PretrainConfig, f"pretrain/configs/{name}.yaml", ["data.shards=/somewhere"])
        per_rank[name] = cfg.data.token_budget * cfg.train.grad_accum
        assert cfg.train.max_steps == round(6 * 17e6 / 1344, -3) == 76_000
        assert (cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.optim.min_lr) == (2000, None, 1e-5)
        assert cfg.optim.lr == (5e-5 if name == "giga" else 1e-4)   # the original config's giga override / default
    assert set(per_rank.values()) == {32768}, per_rank


WEIGHT_DECAY_GROUPS = """
import json, os, warnings
warnings.filterwarnings("ignore")
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
import deepspeed, torch
from pretrain.config import OptimConfig
from pretrain.train import PretrainModel, _adamw, _exit
from rnalm.config import ModelConfig

deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
cfg = ModelConfig.preset("nano", dim=64, num_layers=2, num_heads=4)
out = {}
for zero_init in (False, True):
    if zero_init:
        with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                      "zero_optimization": {"stage": 3}}):
            model = PretrainModel(cfg)
    else:
        model = PretrainModel(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = _adamw(model, OptimConfig(weight_decay=0.01), torch.device("cpu")).param_groups
    out[str(zero_init)] = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
print(json.dumps(out))
_exit(0, clean=True)
"""


def test_weight_decay_groups_are_the_same_when_the_model_is_built_inside_zero_init():
    """train.zero_init builds the model inside deepspeed.zero.Init, whose parameters are already partitioned
    (empty 1-d placeholders) when the optimizer groups them: the matrices must still get weight decay."""
    import json
    import subprocess
    import sys

    from tests.deploy.daemons import free_port
    from tests.pretrain.trainer_runs import REPO, trainer_env

    proc = subprocess.run([sys.executable, "-c", WEIGHT_DECAY_GROUPS], cwd=REPO, capture_output=True, text=True,
                          env=dict(trainer_env(), PORT=str(free_port())), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    groups = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, zero_init = groups["False"], groups["True"]
    decayed = {n for n, wd in plain.items() if wd > 0}
    assert "embedding.weight" in decayed and "transformer.blocks.0.mh_attn.Wqkv.weight" in decayed
    assert not any(n.endswith(("bias", "beta")) or "layer_norm" in n for n in decayed)
    assert zero_init == plain


ZERO3_ENGINE = """
import sys, torch, deepspeed
from deepspeed.utils import z3_leaf_module
from pretrain.config import PretrainConfig, deepspeed_config
from pretrain.train import _adamw, _default_distributed_env, _exit, _new_model
from rnalm.configfile import load
cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", sys.argv[1:])
_default_distributed_env()
deepspeed.init_distributed(auto_mpi_discovery=False)
ds = deepspeed_config(cfg, bf16=False)
model = _new_model(cfg, ds, torch.device("cpu"))
deepspeed.initialize(model=model, optimizer=_adamw(model, cfg.optim, torch.device("cpu")), config=ds)
print("F.linear:", torch.nn.functional.linear.__module__)
print("leaf blocks:", [z3_leaf_module(b) for b in model.transformer.blocks])
_exit(0, clean=True)
"""


def test_deepspeed_config_leaves_the_run_config_as_it_was(tmp_path):
    """The trainer writes the run's config beside its checkpoints: building the DeepSpeed dict must not change it."""
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", [f"train.ds_config={empty}", "model.compile=true",
                                                                 "train.ds_overrides={zero_optimization: {stage: 3}}"])
    ds = deepspeed_config(cfg, bf16=False)
    # the command line's mapping merged into tiny_cpu.yaml's
    assert ds["zero_optimization"] == {"stage3_param_persistence_threshold": 0, "stage": 3,
                                       "memory_efficient_linear": False}
    assert cfg.train.ds_overrides == {"zero_optimization": {"stage3_param_persistence_threshold": 0, "stage": 3}}


@pytest.mark.parametrize("compile_", ["true", "false"])
def test_zero3_gathers_each_block_at_once_and_keeps_torchs_own_linear(compile_):
    """ZeRO-3's memory-efficient F.linear reads each weight's ds_id, and dynamo (torch 2.11) guarded on it: one
    recompilation per block, 25 of giga's 33 blocks eager on the H200. Blocks as ZeRO-3 leaves: one gather per
    block, no hooks on its submodules (eager too: median step 510 -> 383-427 ms for 33 narrow blocks on this CPU)."""
    proc = subprocess.run([sys.executable, "-c", ZERO3_ENGINE, f"model.compile={compile_}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert "F.linear: torch._C._nn" in proc.stdout and "leaf blocks: [True, True]" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-3000:]


def test_the_log_closes_a_line_a_failed_write_left_torn_and_names_itself_when_it_cannot_write(tmp_path):
    from pretrain.train import LogWriteError, _JsonLog

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "tok')  # a full disk cut the last record short
    log = _JsonLog(path)
    log.write({"event": "start"})
    log.close()
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"step": 1}', '{"step": 2, "tok'] and json.loads(lines[2])["event"] == "start"
    _JsonLog(path).write({"event": "done"})
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()[2:]] == ["start", "done"]
    _JsonLog(tmp_path / "refused" / "log.jsonl").close()
    assert not (tmp_path / "refused").exists()  # a log without records leaves no file
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full to fail a write")
    with pytest.raises(LogWriteError, match="could not write /dev/full: No space left on device"):
        _JsonLog(Path("/dev/full")).write({"event": "start"})


BF16_GRADIENT_SUM = """
import json, os, sys, torch, deepspeed
from deepspeed.utils import safe_get_full_grad
from pretrain.config import PretrainConfig, deepspeed_config
from pretrain.train import _exit
from rnalm.configfile import load
cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml", ["train.grad_accum=8", *sys.argv[1:]])
deepspeed.init_distributed(auto_mpi_discovery=False)
model = torch.nn.Linear(8, 1, bias=False).to(torch.bfloat16)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
                                  config=deepspeed_config(cfg, bf16=True))
rank = int(os.environ["RANK"])
for c in ([1.0] + [2.0 ** -10] * 7) if rank == 0 else [3 * 2.0 ** -12] * 8:  # the trainer's backward (train.py)
    engine.backward(engine(torch.ones(1, 8, dtype=torch.bfloat16)).float().sum() * c, scale_wrt_gas=False)
    if engine.is_gradient_accumulation_boundary():
        grad = safe_get_full_grad(engine.module.weight)
    engine.step()
if rank == 0:
    print(json.dumps(sorted(set(grad.float().tolist()[0]))))
_exit(0, clean=True)  # as the trainer leaves: gloo aborts now and then at interpreter shutdown
"""


@pytest.mark.parametrize(("overrides", "want"), [
    ([], 1 + 7 * 2 ** -10 + 3 * 2 ** -9),                                               # ZeRO-3: exact
    (["train.ds_config=ds_configs/zero2.json"], 1 + 7 * 2 ** -10 + 3 * 2 ** -9),         # ZeRO-2: exact
    (["train.ds_config=ds_configs/zero2.json", "train.ds_overrides={zero_optimization: {stage: 1}}"],
     1 + 2 ** -7),          # ZeRO-1: micro-batches summed in bf16 (config.py), its bf16 gradient rounds 1 + 3 x 2^-9
    (["train.ds_overrides={data_types: {grad_accum_dtype: bf16}, communication_data_type: bf16}"], 1.0),
])
def test_bf16_gradients_are_summed_in_fp32_over_micro_batches_and_ranks(overrides, want):
    """A bf16 step's gradient: rank 0 adds seven micro-batch gradients of 2^-10 to one of 1 (each below bf16's
    step at 1), rank 1 eight of 3 x 2^-12 (their sum too). DeepSpeed's default for bf16 sums in bf16 and loses
    all of them (the last case, its settings restored)."""
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
                           "--no-python", sys.executable, "-c", BF16_GRADIENT_SUM, *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [want / 2]   # the mean of the two ranks


def test_token_dropouts_mask_ratio_follows_the_masking_rate():
    """Token dropout rescales the embeddings by the share of <mask> tokens the model trained with, in training and
    after it; the presets' 0.12 stayed when data.mask_prob changed (a 0.3 run trained at 0.24)."""
    from pretrain.train import model_changes
    from rnalm.config import ModelConfig

    default = load(PretrainConfig, "pretrain/configs/giga.yaml", ["data.shards=/somewhere"])
    assert default.model_config() == ModelConfig.preset("giga")
    more = load(PretrainConfig, "pretrain/configs/giga.yaml", ["data.shards=/somewhere", "data.mask_prob=0.3"])
    assert more.model_config().mask_ratio_train == pytest.approx(0.24)
    assert model_changes(default.model_config().to_dict(), more.model_config()) == {}   # a resume may change it


@pytest.mark.parametrize("override, message", [
    ("--optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),          # DeepSpeed: clipping off
    ("--train.max_steps=0", "train.max_steps must be >= 1, got 0"),  # not only 'warm-up must be below it'
    ("--optim.min_lr=nan", "optim.min_lr: expected a finite number, got 'nan'"),  # passed every check
    ("--train.valid_sampling=cluter", "'cluter' is not one of 'cluster', 'uniform'"),
    ("--train.ds_overrides={zero_optimization: null}", "zero_optimization must be a mapping, got None"),
    # from a user review: each was accepted, or failed after start-up in a traceback
    ("--data.infinite=false", "data.infinite=false and data.max_records are the validation pass's"),  # 1 epoch
    ("--data.mask_prob=0", "data.mask_prob must be > 0"),  # a loss of 0 at every step
    ("--optim.betas=[1.5, 0.999]", "optim.betas must be two numbers in [0, 1), got [1.5, 0.999]"),
    ("--optim.eps=-1", "optim.eps must be >= 0"),
    ("--optim.weight_decay=-0.5", "optim.weight_decay must be >= 0"),  # trained with negative decay
    ("--optim.warmup_start_lr=1.0", "optim.min_lr and optim.warmup_start_lr <= optim.lr"),  # a falling warm-up
    ("--train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row must be >= 1"),
    ("--train.ds_overrides={zero_optimization: {stage: 0}}", "zero_optimization.stage must be 1, 2 or 3, got 0"),
    ("--train.profile_at=999999", "train.profile_at (999999) is past train.max_steps"),  # silently no profile
])
def test_settings_that_would_train_otherwise_than_asked_are_refused_before_start_up(override, message, tmp_path):
    """Each was accepted (or ended in a traceback after start-up): the run trained without clipping, with a NaN
    LR floor, or failed after the model build and deepspeed.initialize."""
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg = load(PretrainConfig, "pretrain/configs/tiny_cpu.yaml",
                   [f"--data.shards={tmp_path}", f"--train.out_dir={tmp_path / 'run'}", override])
        cfg.validate()
