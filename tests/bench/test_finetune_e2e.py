"""bench/finetune_gpu_e2e.py: `--stage all` is a fresh experiment; stages and fine-tune overrides."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
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


def test_every_file_the_stages_write_is_an_output(tmp_path):
    """The table stage writes table.json beside table.md; an earlier run's would be left beside this run's files."""
    e2e = load_script()
    for name in ("ss_pretrained", "ss_random"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"rows": {name: {"n": 1, "f1": 0.5}, "RNAfold": {"n": 1, "f1": 0.4}}, "history": []}))
    e2e.stage_table(tmp_path, None)
    assert (tmp_path / "table.md").exists()
    e2e.clear_outputs(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_pretraining_corpus_holds_no_test_sequence(shared_data, tmp_path):
    """'Pretrained on ncRNA without bpRNA' dropped only source=bpRNA1m90: 55 of TS0's 473 sequences were still in
    the corpus (Rfam seeds, nRC), 90 by the near-duplicate rule, so the pretrained model had seen its test set."""
    from finetune.neardup import near_duplicate_mask
    from finetune.tasks.ss import SSDataConfig, load_splits

    e2e = load_script()
    test = [r.sequence.upper().replace("T", "U") for r in load_splits(SSDataConfig(root=str(shared_data))).test]
    out = tmp_path / "corpus.fa"
    kept, bprna, near_test = e2e.write_pretraining_fasta(shared_data / "ncrna" / "ncrna_corpus.fasta.gz", out, test)
    headers, seqs = [], []
    for line in out.read_text().splitlines():
        if line.startswith(">"):
            headers.append(line)
            seqs.append("")
        else:
            seqs[-1] += line.strip().upper().replace("T", "U")
    assert len(seqs) == kept > 10_000 and bprna > 0 and near_test >= 55
    assert not any("source=bpRNA1m90" in h for h in headers)
    assert not set(test) & set(seqs) and not near_duplicate_mask(seqs, test).any()
    assert all("rfam_acc=" in h for h in headers[:100])  # headers kept whole: the label key of the build


def test_the_two_parallel_fine_tunes_share_the_cores(tmp_path, monkeypatch):
    """Both fine-tunes with torch's default threads (one per core each) ran 2.3x slower on 2 cores than with one
    thread each; a user's OMP_NUM_THREADS is kept."""
    e2e = load_script()
    probe = "import sys, torch; open(sys.argv[1], 'w').write(str(torch.get_num_threads()))"
    monkeypatch.setattr(e2e, "finetune_cmd",
                        lambda work, args, random: [sys.executable, "-c", probe, str(work / f"threads_{random}")])
    half = max(1, len(os.sched_getaffinity(0)) // 2)
    mine = 2 if half == 1 else 1  # torch takes no more threads than there are cores
    for env, want in ((None, half), (str(mine), mine)):
        if env is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", env)
        e2e.finetune_both(tmp_path, None)
        assert [(tmp_path / f"threads_{r}").read_text() for r in (False, True)] == [str(want)] * 2


def test_fine_tune_overrides_reach_both_arms_after_the_defaults(tmp_path):
    """A second seed of the comparison is `--ft-set train.seed=1`; an override of a default (batch size 8, the
    epochs of --ft-epochs) wins."""
    from argparse import Namespace

    from finetune.tasks.ss import SSConfig
    from rnalm.configfile import from_cli

    e2e = load_script()
    overrides = ["train.seed=1", "train.batch_size=4", "train.epochs=5"]
    args = Namespace(tiny=False, preset="nano", ft_epochs=3, ft_seconds=100, ft_set=overrides)
    for random in (False, True):
        argv = e2e.finetune_cmd(tmp_path, args, random)
        assert argv[2:5] == ["finetune", "ss", "train"]
        cfg = from_cli(SSConfig, argv[5:], prog="test")
        assert (cfg.train.seed, cfg.train.batch_size, cfg.train.epochs) == (1, 4, 5)


def test_the_stages_named_run_in_the_pipelines_order_and_keep_earlier_outputs(tmp_path, monkeypatch):
    """`--stage table ft-random ft`: both fine-tunes at once, then the table; only `all` starts afresh."""
    e2e = load_script()
    ran = []
    monkeypatch.setattr(e2e, "finetune_both", lambda work, args: ran.append("both"))
    monkeypatch.setattr(e2e, "stage_table", lambda work, args: ran.append("table"))
    monkeypatch.setattr(e2e, "sh", lambda cmd: ran.append("random" if "--model.random_preset=micro" in cmd
                                                           else "convert" if "pretrain.convert" in cmd else cmd))
    (tmp_path / "converted").mkdir()
    for stages, want in ((["table", "ft-random", "ft"], ["both", "table"]),
                         (["ft-random", "convert"], ["convert", "random"])):
        ran.clear()
        monkeypatch.setattr(sys, "argv", ["e2e", "--work", str(tmp_path), "--stage", *stages])
        e2e.main()
        assert ran == want
    assert (tmp_path / "converted").is_dir()


def test_each_stage_exports_what_it_wrote_before_the_next_one_starts(tmp_path, monkeypatch):
    """The GPU plan kills a step past its time with SIGKILL (no finally runs): the pretraining's log must already
    be in --export while the fine-tunes run, and a failing stage still exports what came before it."""
    e2e = load_script()
    work, dest = tmp_path / "work", tmp_path / "export"
    seen = {}

    def pretrain(work, args):
        (work / "pretrain").mkdir()
        (work / "pretrain" / "log.jsonl").write_text('{"step": 1}\n')

    def fine_tunes(work, args):
        seen["exported"] = sorted(p.name for p in dest.iterdir())
        raise SystemExit("a fine-tune failed")

    monkeypatch.setattr(e2e, "stage_pretrain", pretrain)
    monkeypatch.setattr(e2e, "finetune_both", fine_tunes)
    monkeypatch.setattr(sys, "argv", ["e2e", "--work", str(work), "--stage", "pretrain", "ft", "ft-random",
                                      "--export", str(dest)])
    try:
        e2e.main()
    except SystemExit as stop:
        assert str(stop) == "a fine-tune failed"
    else:
        raise AssertionError("the failed fine-tune did not stop the run")
    assert seen["exported"] == ["pretrain_log.jsonl"]
    assert (dest / "pretrain_log.jsonl").read_text() == '{"step": 1}\n'
