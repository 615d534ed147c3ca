"""`python -m finetune <task> {train,evaluate,predict}`, `python -m finetune embed`, `python -m finetune predict-ss`.

Options are typed config fields: `--section.key=value` (task commands: sections model, data, train,
unfreeze, head, eval) or `--key=value` (embed, predict-ss, <task> predict), plus `--config FILE.yaml`.
`--help` lists every option with its default.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from finetune.tasks import TASKS
from rnalm.configfile import from_cli, save_yaml
from rnalm.io import read_json
from rnalm.files import check_out_dir
from rnalm.runlock import RunLockError

USAGE = """usage:
  python -m finetune {ss,splice,mrl} {train,evaluate} [--config FILE] [--section.key=value ...]
  python -m finetune {classify,regress} train --model.path=CHECKPOINT --data.train=CSV --data.test=CSV [...]
  python -m finetune {classify,regress} evaluate --model.path=FT_DIR --data.test=CSV
  python -m finetune {ss,splice,mrl,classify,regress} predict --model=FT_DIR --fasta=FILE [--out=DIR] [...]
  python -m finetune predict-ss --model=FT_DIR --fasta=FILE [--out=DIR] [--format=dbn|bpseq|ct]
  python -m finetune embed --model=CHECKPOINT --fasta=FILE [--out=DIR] [--label_key=class]
  python -m finetune import-original-ss --checkpoint=ss_bprna_ft.pt --out=DIR   (then predict-ss --model=DIR)
add --help after a command for its options and defaults"""


def _task_module(task: str):
    from finetune.tasks import classify, mrl, regress, splice, ss

    return {"ss": (ss, ss.SSConfig), "splice": (splice, splice.SpliceConfig), "mrl": (mrl, mrl.MRLConfig),
            "classify": (classify, classify.ClassifyConfig), "regress": (regress, regress.RegressConfig)}[task]


def run(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], list(argv[1:])
    commands = {"predict-ss": lambda args: _predict("ss", args, "python -m finetune predict-ss"),
                "import-original-ss": _import_original_ss, "embed": _embed}
    try:
        if cmd in TASKS:
            return _task(cmd, rest)
        if cmd in commands:
            return commands[cmd](rest)
    except (OSError, ValueError, RunLockError) as e:  # (a StructureError is a ValueError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


def _task(cmd: str, rest: list[str]) -> int:
    from finetune.backbone import remove_evaluation, remove_finetuned

    if not rest or rest[0] not in ("train", "evaluate", "predict"):
        print(f"python -m finetune {cmd}: expected train, evaluate or predict\n{USAGE}", file=sys.stderr)
        return 2
    action, rest = rest[0], rest[1:]
    prog = f"python -m finetune {cmd} {action}"
    if action == "predict":
        return _predict(cmd, rest, prog)
    _refuse_model_option(rest)
    module, cfg_cls = _task_module(cmd)
    cfg = from_cli(cfg_cls, rest, prog=prog)
    check_out_dir(cfg.train.out_dir, "--train.out_dir")
    for name in ("limit_train", "limit_valid", "limit_test"):
        if (value := getattr(cfg.data, name)) is not None and value < 1:
            raise ValueError(f"--data.{name} ({value}) must be >= 1 (unset: all records)")
    if action == "evaluate" and not cfg.model.path:
        raise ValueError("--model.path is required: the fine-tuned model directory to evaluate")
    start_lock, run_lock = _out_dir_locks(cmd, action, cfg)
    with run_lock:
        with start_lock:
            loaded: dict[str, Any] = {}
            if action == "train":
                loaded = _check_train_start(cmd, cfg)  # a start refused for a user error keeps the earlier model
                _claim_out(cmd, cfg)
                remove_finetuned(cfg.train.out_dir)  # before the new config: an ArchiveII summary is written by no fit
            else:
                remove_evaluation(cfg.train.out_dir)
            save_yaml(cfg, f"{cfg.train.out_dir}/{action}_config.yaml")
        result = getattr(module, action)(cfg, **loaded)
    _print_summary(result, cfg.train.out_dir, action)
    return 0


def _import_original_ss(rest: list[str]) -> int:
    from finetune.backbone import FT_META, ImportConfig, import_original_ss

    cfg = from_cli(ImportConfig, rest, prog="python -m finetune import-original-ss")
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required (the original's ss_*_ft.pt)")
    out = import_original_ss(cfg.checkpoint, cfg.out, cfg.held_out_family, num_heads=cfg.num_heads)
    family = read_json(out / FT_META).get("data", {}).get("test")
    print(f"wrote {out}: use python -m finetune predict-ss --model={out} --fasta=..."
          + (f" (ArchiveII family {family} held out: ss evaluate scores it on that family only)" if family else ""))
    return 0


def _embed(rest: list[str]) -> int:
    from finetune.embed import EmbedConfig, embed

    cfg = from_cli(EmbedConfig, rest, prog="python -m finetune embed")
    out = embed(cfg)
    print(f"wrote {cfg.out}/cls.npy {tuple(out['cls'].shape)}, mean.npy, ids.txt"
          + (f", {out['plot'].name} ({out['plotted']})" if out["plot"] else ""))
    return 0


def _refuse_model_option(rest: list[str]) -> None:
    """`--model=DIR` is predict's and embed's option; train and evaluate take the model as --model.path."""
    for i, arg in enumerate(rest):
        if arg == "--model" or arg.startswith("--model="):
            value = (rest[i + 1] if i + 1 < len(rest) else "DIR") if arg == "--model" else arg[len("--model="):]
            raise ValueError(f"{arg}: did you mean --model.path={value}? (--model= is predict's and embed's option)")


def _check_train_start(task: str, cfg: Any) -> dict[str, Any]:
    """All a train run can check before it clears OUT: the train options, ArchiveII families, that the backbone
    is not a model this run replaces (OUT itself, or an ArchiveII fold's OUT/<family>), the backbone itself
    (loaded here once to check it, and again by the task: ~1 s for giga on a CPU, no random initialisation), and
    the user's data files, whose splits it returns for the task's `train` (`{"data": ...}`; {} otherwise)."""
    from finetune.backbone import load_backbone, random_config
    from finetune.tasks.ss import fold_families
    from finetune.trainer import check_train_config

    check_train_config(cfg.train)
    out = Path(cfg.train.out_dir).resolve()
    replaced = [out]
    if task == "ss" and cfg.data.dataset == "archiveii":
        families = fold_families(cfg.data.test_family)
        replaced += [out / fam for fam in families] if len(families) > 1 else []
    if cfg.model.random_preset is None and cfg.model.path:
        src = Path(cfg.model.path).resolve()
        if any(src == d or (d != out and d in src.parents) for d in replaced):
            raise ValueError(f"--train.out_dir={cfg.train.out_dir} holds --model.path={cfg.model.path}, which this "
                             "run would overwrite: set another --train.out_dir")
    if cfg.model.random_preset is None:
        load_backbone(cfg.model)
    else:  # its config only: giga's random initialisation takes ~9 s on a CPU
        random_config(cfg.model)
    if task == "ss":
        from finetune.tasks.ss import check_files_option, check_rnafold

        check_files_option(cfg.data)
        check_rnafold(cfg.eval)
    if task in ("classify", "regress") or (task == "ss" and cfg.data.dataset == "files"):
        return {"data": _task_module(task)[0].load_splits(cfg.data)}  # a bad line is found before OUT is cleared
    return {}


def _out_dir_locks(task: str, action: str, cfg: Any) -> tuple[AbstractContextManager, AbstractContextManager]:
    """(for the start, for the run; finetune.outlock): a train run holds OUT while it runs (a second run into it
    would overwrite its model); the processes of an ArchiveII run over several families hold it for a moment at
    the start (and at each family's claim), so that they share out the families."""
    from finetune import outlock
    from finetune.tasks import ss

    if action != "train":
        return nullcontext(), nullcontext()
    if task == "ss" and ss.several_families(cfg):
        return outlock.held(Path(cfg.train.out_dir)), nullcontext()
    return nullcontext(), outlock.single_run(Path(cfg.train.out_dir))


def _claim_out(task: str, cfg: Any) -> None:
    """An ArchiveII run over several families records its settings in OUT, after the checks."""
    from finetune.tasks import ss

    if task == "ss" and ss.several_families(cfg):
        ss.claim_out(cfg)


def _predict(task: str, rest: list[str], prog: str) -> int:
    from finetune.predict import PredictConfig, StructurePredictConfig, predict_ss, predict_table

    cfg = from_cli(StructurePredictConfig if task == "ss" else PredictConfig, rest, prog=prog)
    if task == "ss":
        preds = predict_ss(cfg)
        print(f"predicted {len(preds)} structures -> {cfg.out} ({cfg.format})")
    else:
        print(f"wrote {predict_table(cfg, task)}")
    return 0


def _print_summary(result: dict, out_dir: str, action: str) -> None:
    if result.get("pending"):
        print(f"ArchiveII families not finished by this process, so the summary ({out_dir}/results.md) is left to "
              "the process that finishes the last one:")
        for family, holder in result["pending"].items():
            print(f"  {family}: {holder}")
        print("A family held by no process (its process failed or was stopped) is trained by running the same "
              "command again; finished families are reused")
        return
    name = "results" if action == "train" else "eval_results"
    try:
        print(open(f"{out_dir}/{name}.md").read())
    except OSError:
        pass
    print(f"results: {out_dir}/{name}.json")


def main() -> None:
    try:
        code = run(sys.argv[1:])
    except KeyboardInterrupt:
        print("python -m finetune: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
