"""rnalm.configfile: typed YAML sections + --section.key=value overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from rnalm.configfile import ConfigError, changed_settings, from_cli, from_dict, load, merge_dicts, save_yaml, to_dict


@dataclass
class Optim:
    lr: float = 5e-5
    warmup_steps: int = 2000
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Train:
    out_dir: str = "runs/x"
    precision: Literal["fp32", "bf16"] = "bf16"
    max_steps: int | None = None
    activation_checkpointing: bool = False
    tags: list[str] = field(default_factory=list)
    cache: Path | None = None
    note: str | None = None


@dataclass
class Run:
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_in_order(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1e-4\n  warmup_steps: 10\ntrain:\n  precision: fp32\n")
    cfg = load(Run, path, ["--optim.lr=3e-4", "train.max_steps=50", "--train.tags=[a, b]"])
    assert cfg.optim == Optim(lr=3e-4, warmup_steps=10)
    assert cfg.train.precision == "fp32" and cfg.train.max_steps == 50 and cfg.train.tags == ["a", "b"]
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.betas, tuple)


def test_yaml_exponent_without_dot_is_a_float_and_1e3_an_int(tmp_path):
    # PyYAML reads "1e-4" and "1e3" as strings; the typed fields still get numbers.
    cfg = load(Run, write(tmp_path, "optim:\n  lr: 1e-4\n  warmup_steps: 1e3\n"))
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_steps == 1000


def test_str_override_stays_verbatim():
    cfg = load(Run, None, ["train.out_dir=007", "--train.max_steps=null", "train.note=yes"])
    assert cfg.train.out_dir == "007" and cfg.train.max_steps is None and cfg.train.note == "yes"
    for null in ("null", "~", "None"):   # an optional string can still be unset
        assert load(Run, None, ["train.note=x", f"train.note={null}"]).train.note is None


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'lrr' in optim; valid keys: lr, warmup_steps, betas"),
    ("optimizer.lr=1", "unknown key 'optimizer' in top level"),
    ("optim.lr=fast", "optim.lr: expected a finite number, got 'fast'"),
    ("optim.lr=nan", "optim.lr: expected a finite number, got 'nan'"),      # passed every `x < low` check
    ("optim.lr=-.inf", "optim.lr: expected a finite number, got -inf"),
    ("optim.warmup_steps=0x10", "optim.warmup_steps: expected an integer, got '0x10'"),   # YAML 1.1: 16
    ("optim.warmup_steps=1:30", "optim.warmup_steps: expected an integer, got '1:30'"),   # YAML 1.1: 90
    ("optim.warmup_steps=1.5", "optim.warmup_steps: expected an integer, got 1.5"),
    ("train.precision=fp16", "'fp16' is not one of 'fp32', 'bf16'"),
    ("train.activation_checkpointing=2", "expected true or false, got 2"),
    ("optim.warmup_steps=true", "optim.warmup_steps: expected an integer, got True"),
    ("train.tags=abc", "train.tags: expected a list, got 'abc'"),
    ("optim.lr", "expected section.key=value"),
    ("optim=3", "optim: expected a mapping of keys for Optim, got int"),
    ("optim.lr.x=3", "optim.lr is not a section"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 items, got 1"),
    ("optim.betas=[0.9, 0.99, 0.5]", "optim.betas: expected 2 items, got 3"),
    ("optim.betas=[0.9, x]", "optim.betas[1]: expected a finite number, got 'x'"),
    ("=5", "override '=5': expected section.key=value"),
    ("train.tags=[a, b", "train.tags: expected a list, got '[a, b'"),  # not YAML: kept as the text it is
    ("train.cache=5", "train.cache: expected a path, got 5"),
])
def test_bad_overrides_are_rejected_clearly(override, message):
    with pytest.raises(ConfigError) as info:
        load(Run, None, [override])
    assert message in str(info.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0\n  momentum: 0.9\n")
    with pytest.raises(ConfigError) as info:
        load(Run, path)
    assert str(path) in str(info.value) and "'momentum'" in str(info.value) and "valid keys" in str(info.value)


def test_a_retired_key_is_refused_with_what_replaced_it(tmp_path):
    """A run's config.yaml from an older version (train.valid_max_batches, retired 2026-12-06): the refusal says
    what the key became, in a file and as an override."""
    from pretrain.config import PretrainConfig

    path = write(tmp_path, "train:\n  valid_max_batches: 20\n  valid_every: 5\n")
    for source, overrides in ((path, []), (None, ["train.valid_max_batches=20"])):
        with pytest.raises(ConfigError) as info:
            load(PretrainConfig, source, overrides)
        assert "'valid_max_batches' is retired: it counted batches per rank; train.valid_max_records" in \
            str(info.value) and "valid keys:" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(PretrainConfig, None, ["train.valid_max_record=20"])  # a typo is only unknown
    assert "retired" not in str(info.value)


def test_bad_file_shapes(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load(Run, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected a mapping of keys for Optim"):
        load(Run, write(tmp_path, "optim: 3\n"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(Run, tmp_path / "missing.yaml")


def test_a_file_gives_strings_and_paths_only_from_text(tmp_path):
    # YAML types unquoted values: a number where a string belongs is refused, not turned into its text
    with pytest.raises(ConfigError, match="train.out_dir: expected a string, got 5"):
        load(Run, write(tmp_path, "train:\n  out_dir: 5\n"))
    cfg = load(Run, write(tmp_path, "train:\n  cache: /data/cache\n"))
    assert cfg.train.cache == Path("/data/cache") and isinstance(cfg.train.cache, Path)


def test_round_trip_through_saved_yaml(tmp_path):
    cfg = load(Run, None, ["optim.lr=2e-3", "train.tags=[x]", "train.cache=/tmp/c"])
    save_yaml(cfg, tmp_path / "out" / "config.yaml")
    again = load(Run, tmp_path / "out" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["optim"]["betas"] == [0.9, 0.98]
    assert to_dict(cfg)["train"]["tags"] == ["x"] and to_dict(cfg)["train"]["cache"] == "/tmp/c"
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]  # no temp file left


def test_from_dict_partial_sections():
    cfg = from_dict(Run, {"train": {"precision": "fp32"}})
    assert cfg.optim == Optim() and cfg.train.precision == "fp32"


def test_cli_parses_config_and_both_override_spellings(tmp_path, capsys):
    path = write(tmp_path, "optim:\n  lr: 0.5\n")
    cfg = from_cli(Run, ["--config", str(path), "--optim.warmup_steps", "7", "--train.precision=fp32"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.precision) == (0.5, 7, "fp32")
    with pytest.raises(SystemExit) as info:
        from_cli(Run, ["--optim.nope=1"])
    assert info.value.code == 2 and "unknown key 'nope'" in capsys.readouterr().err
    for no_value in (["--optim.lr"], ["--optim.lr", "--train.precision=fp32"]):
        with pytest.raises(SystemExit):
            from_cli(Run, no_value)
        assert "override '--optim.lr' has no value" in capsys.readouterr().err
    # dashes for underscores, as dataprep's argparse options are spelt (--label-key there, label_key here)
    cfg = from_cli(Run, ["--optim.warmup-steps=9", "--train.out-dir", "runs/y"])
    assert (cfg.optim.warmup_steps, cfg.train.out_dir) == (9, "runs/y")


def test_help_lists_every_key_with_its_default_as_yaml(capsys):
    with pytest.raises(SystemExit) as info:
        from_cli(Run, ["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for line in ("--optim.lr=5.0e-05", "--optim.betas=[0.9, 0.98]", "--train.max_steps=null",
                 "--train.activation_checkpointing=false", "--train.tags=[]", "--train.out_dir=runs/x"):
        assert f"  {line}\n" in out
    assert "..." not in out  # YAML's end-of-document mark after a plain scalar


def test_help_names_only_the_override_forms_that_work(capsys):
    """pretrain.train --help offered `--key=value`, but `--max_steps=5` is refused: no top-level fields there."""
    with pytest.raises(SystemExit):
        from_cli(Run, ["--help"])
    assert "overrides (--section.key=value), with the built-in defaults" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        from_cli(Optim, ["--help"])
    assert "overrides (--key=value), with the built-in defaults" in capsys.readouterr().out


@dataclass
class FineTune:  # a task whose sections start from other defaults than their classes'
    optim: Optim = field(default_factory=lambda: Optim(lr=1e-5, warmup_steps=0))
    train: Train = field(default_factory=lambda: Train(out_dir="runs/ft", precision="fp32"))


def test_a_partial_section_keeps_the_defaults_its_parent_gives_it(tmp_path):
    """`finetune splice train --train.out_dir=D` rebuilt the whole train section from TrainConfig's class defaults:
    batch 32 -> 1, AdamW -> Adam, lr 1e-5 -> 1e-4, silently, in every documented fine-tune command."""
    cfg = from_cli(FineTune, ["--train.out_dir=elsewhere", "--optim.warmup_steps=10"])
    assert cfg.train == Train(out_dir="elsewhere", precision="fp32")
    assert cfg.optim == Optim(lr=1e-5, warmup_steps=10)
    assert load(FineTune, write(tmp_path, "optim: {betas: [0.8, 0.9]}\n")).optim == Optim(lr=1e-5, warmup_steps=0,
                                                                                          betas=(0.8, 0.9))
    assert from_dict(FineTune, to_dict(cfg)) == cfg


def test_a_section_left_empty_in_a_file_keeps_the_defaults_its_parent_gives_it(tmp_path):
    """`train:` with every key commented out is None in YAML: the ss task's section became TrainConfig's class
    defaults (epochs 30 -> 10, lr 5e-4 -> 1e-4, out_dir finetune_out/ss -> finetune_out), silently."""
    cfg = load(FineTune, write(tmp_path, "optim:\ntrain:\n  # out_dir: x\n"))
    assert cfg == FineTune()


def test_integers_are_decimal_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads 010 as 8 (octal), 0x10 as 16 and 1:30 as 90; a config's numbers are decimal."""
    assert load(Run, None, ["--optim.warmup_steps=010"]).optim.warmup_steps == 10
    assert load(Run, write(tmp_path, "optim:\n  warmup_steps: 0755\n  lr: 1e-3\n")).optim.warmup_steps == 755
    with pytest.raises(ConfigError, match="expected an integer, got '1:00:00'"):
        load(Run, write(tmp_path, "train:\n  max_steps: 1:00:00\n"))
    assert load(Run, None, ["--train.max_steps=-5", "--optim.lr=+2e-4"]).train.max_steps == -5


@dataclass
class WithMapping:
    extra: dict[str, Any] = field(default_factory=dict)


def test_a_mapping_override_merges_into_the_files_key_by_key(tmp_path):
    """--train.ds_overrides={communication_data_type: bf16} dropped the file's own ds_overrides (a ZeRO stage among
    them) without a word."""
    path = write(tmp_path, "extra:\n  zero_optimization: {stage: 2, overlap_comm: true}\n  wall_clock_breakdown: false\n")
    cfg = load(WithMapping, path, ["--extra={zero_optimization: {stage: 1}, communication_data_type: bf16}"])
    assert cfg.extra == {"zero_optimization": {"stage": 1, "overlap_comm": True}, "wall_clock_breakdown": False,
                         "communication_data_type": "bf16"}


@dataclass
class Shapes:
    sizes: tuple[int, ...] = ()
    weights: dict[str, int] = field(default_factory=dict)


def test_variable_tuples_and_typed_mappings_are_coerced():
    cfg = from_dict(Shapes, {"sizes": [1, "2e1"], "weights": {"a": 3}})
    assert cfg.sizes == (1, 20) and isinstance(cfg.sizes, tuple) and cfg.weights == {"a": 3}
    with pytest.raises(ConfigError, match="weights.a: expected an integer, got 'x'"):
        from_dict(Shapes, {"weights": {"a": "x"}})


def test_an_override_into_a_section_the_file_gives_a_value_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="override --train.note: train is not a mapping in the file"):
        load(Run, write(tmp_path, "train: 5\n"), ["train.note=x"])


def test_a_bare_double_dash_is_not_an_override(capsys):
    with pytest.raises(SystemExit):
        from_cli(Run, ["--"])
    assert "unexpected argument '--'" in capsys.readouterr().err


def test_from_dict_keeps_the_base_settings_of_a_partial_section():
    base = Run(optim=Optim(lr=1.0, warmup_steps=7))
    assert from_dict(Run, {"optim": {"lr": 2.0}}, base=base).optim == Optim(lr=2.0, warmup_steps=7)


def test_merge_dicts_merges_mappings_and_replaces_everything_else():
    base = {"a": {"x": 1, "y": 2}, "b": None, "c": 1}
    assert merge_dicts(base, {"a": {"y": 3}, "b": {"z": 1}, "c": {"z": 2}}) == {
        "a": {"x": 1, "y": 3}, "b": {"z": 1}, "c": {"z": 2}}
    assert base == {"a": {"x": 1, "y": 2}, "b": None, "c": 1}


def test_changed_settings_names_changes_and_ignores_settings_only_one_side_has():
    then = {"seed": 1, "optim": {"lr": 1.0, "old": 3}, "gone": {"x": 1}}
    now = {"seed": 2, "optim": {"lr": 2.0, "new": 4}}
    assert changed_settings(then, now) == {"optim.lr": (1.0, 2.0), "seed": (1, 2)}
