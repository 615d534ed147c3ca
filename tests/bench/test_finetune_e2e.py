"""bench/finetune_gpu_e2e.py: `--stage all` is a fresh experiment."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "finetune_gpu_e2e.py"


def load_script():
    spec = importlib.util.spec_from_file_location("finetune_gpu_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fresh_experiment_removes_every_earlier_output_and_nothing_else(tmp_path):
    """A rehearsal found the pretrain stage resuming (here: refusing) the previous run's checkpoint after the data
    stage had rebuilt the shards; and an earlier table would have been reported as this run's."""
    e2e = load_script()
    for name in e2e.OUTPUTS:
        target = tmp_path / name
        if "." in name:
            target.write_text("old")
        else:
            (target / "sub").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    e2e.clear_outputs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    e2e.clear_outputs(tmp_path)  # nothing there: no error
