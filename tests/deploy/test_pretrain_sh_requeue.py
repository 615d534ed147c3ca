"""pretrain.sh requeues the job after the time-limit/preemption USR1 only when the ranks stopped on it with a
checkpoint saved (exit 0, `preempted` the last event of log.jsonl). A run that finished anyway, a refused start
(exit 2, e.g. a config error), a non-finite stop (exit 3) or a crash ends the job: requeued, it would only repeat
the same outcome, and with a time limit at or below the --signal lead (Slurm then signals every run at once) it
would loop forever. Stub scontrol/srun/squeue as in test_pretrain_sh_layout; rank 0 of a stand-in trainer sends
USR1 to the batch shell, as Slurm does, then ends the way the case says."""
from __future__ import annotations

import json
import shlex

import pytest

from tests.deploy.test_pretrain_sh_layout import run_script

TRAINER = r"""if [ "$1 $2" = '-m pretrain.train' ]; then
  if [ "$RANK" = 0 ]; then   # to the batch shell, the topmost pretrain.sh process (srun runs in a subshell)
    shell=$$
    until grep -qaF slurm/pretrain.sh /proc/$shell/cmdline; do shell=$(cut -d' ' -f4 /proc/$shell/stat); done
    while parent=$(cut -d' ' -f4 /proc/$shell/stat) && grep -qaF slurm/pretrain.sh /proc/$parent/cmdline; do shell=$parent; done
    kill -USR1 "$shell"
    sleep 1
    echo -n {line} >> {log}
  fi
  exit {code}
fi
exec "$REAL_PYTHON" "$@"
"""
PREVIOUS_RUN = {"event": "preempted", "step": 40}   # what the run before a requeue left as the last line

CASES = {  # the ranks' last log event, their exit code -> requeued?
    "saved on the signal": ({"event": "preempted", "step": 57}, 0, True),
    "finished anyway": ({"event": "done", "step": 100}, 0, False),
    "refused start (config error)": (None, 2, False),
    "non-finite stop": ({"event": "stopped_nonfinite", "step": 57}, 3, False),
    "crash": (None, 1, False),
}


@pytest.mark.parametrize("case", CASES)
def test_requeue_only_when_the_ranks_saved_on_the_signal(case, tmp_path):
    last, code, requeued = CASES[case]
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps(PREVIOUS_RUN) + "\n")
    line = json.dumps(last) + "\n" if last else ""
    trainer = TRAINER.format(line=shlex.quote(line), log=shlex.quote(str(out / "log.jsonl")), code=code)
    r, calls, sd = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer,
                              args=(f"--train.out_dir={out}",))
    assert "USR1" in r.stdout, r.stdout + r.stderr
    assert ("scontrol requeue 123456" in calls) == requeued, r.stdout + r.stderr
    assert r.returncode == code, r.stdout + r.stderr
    # a failed job keeps its targets, so that Prometheus finds its ranks down and RnalmRankDown pages
    assert len(list(sd.glob("*.json"))) == (code != 0), r.stdout + r.stderr


EARLY_SIGNAL_TRAINER = r"""if [ "$1 $2" = '-m pretrain.config' ]; then   # the batch shell reads the config: Slurm signals now
  shell=$$
  while parent=$(cut -d' ' -f4 /proc/$shell/stat) && grep -qaF slurm/pretrain.sh /proc/$parent/cmdline; do shell=$parent; done
  kill -USR1 "$shell"
fi
if [ "$1 $2" = '-m pretrain.train' ]; then
  if [ "$RANK" = 0 ]; then   # one step, then the forwarded USR1 (scancel's stub logs it) stops the rank
    for _ in $(seq 100); do grep -q 'scancel --signal=USR1' "$CALLS" && break; sleep 0.1; done
    grep -q 'scancel --signal=USR1' "$CALLS" || exit 1
    echo '{"event": "preempted", "step": 41}' >> {log}
  fi
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def test_signal_before_the_ranks_start_still_runs_them(tmp_path):
    """A USR1 before srun (a time limit within the --signal lead: Slurm signals at the start) must not requeue
    at once: every run would requeue without a step, for ever. The ranks start, the signal is forwarded to
    them, they stop after a step with a checkpoint and only then is the job requeued."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps(PREVIOUS_RUN) + "\n")
    trainer = EARLY_SIGNAL_TRAINER.replace("{log}", shlex.quote(str(out / "log.jsonl")))
    r, calls, _ = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer, args=(f"--train.out_dir={out}",))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "USR1" in r.stdout
    lines = calls.splitlines()
    first = lambda prefix: next(i for i, line in enumerate(lines) if line.startswith(prefix))  # noqa: E731
    # srun runs in the background: its stub may log after the first forward (which repeats while the step lives)
    assert max(first("srun"), first("scancel --signal=USR1 123456")) < first("scontrol requeue 123456"), calls


@pytest.mark.parametrize("limit, left, requeued", [("5:00", "4:10", False),   # --time 5 min, lead 5 min
                                                    ("12:00:00", "11:58:00", True)])  # a preemption early on
def test_a_time_limit_within_the_signal_lead_ends_the_job_instead_of_requeueing_it_for_ever(tmp_path, monkeypatch,
                                                                                           limit, left, requeued):
    """With --time within the --signal lead, Slurm signals every run soon after its start: each ran one step, saved
    and requeued, about 100k times for a 5-minute debug limit. A check before srun caught it only when the signal
    beat srun's start (a user review: Slurm's time-limit sweep signals 0-30 s in, so 7 requeues went through); the
    decision is now made once the ranks saved: a signal with little of the limit left, soon after the start, ends
    the job (its targets removed: a configuration to fix, no page). A preemption early in a long job requeues."""
    from tests.deploy import test_pretrain_sh_layout as layout

    monkeypatch.setitem(layout.STUBS, "squeue", f'case "$*" in *"-o %L"*) echo {left} ;; *"-o %l"*) echo {limit} ;; esac')
    out = tmp_path / "run"
    out.mkdir()
    trainer = EARLY_SIGNAL_TRAINER.replace("{log}", shlex.quote(str(out / "log.jsonl")))
    r, calls, sd = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer, args=(f"--train.out_dir={out}",))
    assert "srun" in calls and ("scontrol requeue 123456" in calls) == requeued, r.stdout + r.stderr
    if not requeued:
        assert r.returncode == 1 and "not requeued: the time limit's signal came" in r.stderr, r.stdout + r.stderr
        assert not list(sd.glob("*.json")), "a configuration to fix paged RnalmRankDown"


TERM_TRAINER = r"""if [ "$1 $2" = '-m pretrain.train' ]; then
  if [ "$RANK" = 0 ]; then   # Slurm's SIGTERM to the batch shell, and a rank killed in its save (rc 137)
    shell=$$
    until grep -qaF slurm/pretrain.sh /proc/$shell/cmdline; do shell=$(cut -d' ' -f4 /proc/$shell/stat); done
    while parent=$(cut -d' ' -f4 /proc/$shell/stat) && grep -qaF slurm/pretrain.sh /proc/$parent/cmdline; do shell=$parent; done
    mkdir -p {out}/checkpoints/step00000050
    kill -TERM "$shell"
    sleep 1
  fi
  exit 137
fi
exec "$REAL_PYTHON" "$@"
"""


def test_a_cancelled_job_is_not_requeued_as_a_crash_after_a_checkpoint(tmp_path):
    """scancel: the batch shell gets SIGTERM with the ranks; a rank that failed in its save (exit 137) after a
    periodic checkpoint read as a crash to resume from, and the job the user had cancelled was requeued."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step00000040").mkdir(parents=True)
    trainer = TERM_TRAINER.replace("{out}", shlex.quote(str(out)))
    r, calls, _ = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer, args=(f"--train.out_dir={out}",))
    assert "SIGTERM" in r.stdout and "not requeued: Slurm is ending the job" in r.stdout, r.stdout + r.stderr
    assert "scontrol requeue" not in calls


CRASH_TRAINER = r"""if [ "$1 $2" = '-m pretrain.train' ]; then
  [ "$RANK" = 0 ] && [ -n {saves} ] && mkdir -p {out}/checkpoints/{saves}
  exit {code}
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.parametrize("saves, code, requeued", [
    ("step00000050", 1, True),     # an NCCL timeout or a GPU error after a new checkpoint: resume from it
    ("", 1, False),                # a crash before the next checkpoint: it would repeat, so the job ends
    ("step00000050", 3, False),    # a non-finite stop (or a refused start, unreadable shards) would repeat
    ("step00000050", 0, False),    # done
])
def test_a_crash_after_a_new_checkpoint_requeues(saves, code, requeued, tmp_path):
    """Only a clean stop on the signal requeued: a weeks-long run ended FAILED on its first NCCL timeout."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step00000040").mkdir(parents=True)  # the newest at the job's start
    trainer = CRASH_TRAINER.format(saves=shlex.quote(saves), out=shlex.quote(str(out)), code=code)
    r, calls, sd = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer, args=(f"--train.out_dir={out}",))
    assert ("scontrol requeue 123456" in calls) == requeued, r.stdout + r.stderr
    assert r.returncode == (0 if requeued else code), r.stdout + r.stderr
    if requeued:
        assert "failed (exit 1) after saving step00000050 (newest at the start: step00000040)" in r.stdout
        assert not list(sd.glob("*.json"))


def test_a_requeue_that_slurm_refuses_keeps_the_targets(tmp_path, monkeypatch):
    """The targets went before `scontrol requeue`: when it failed (a job submitted with --no-requeue), the job
    ended FAILED without a page."""
    from tests.deploy import test_pretrain_sh_layout as layout

    monkeypatch.setitem(layout.STUBS, "scontrol", layout.STUBS["scontrol"].replace(
        '"requeue "*) echo "scontrol $*" >> "$CALLS" ;;', '"requeue "*) echo "scontrol $*" >> "$CALLS"; exit 1 ;;'))
    out = tmp_path / "run"
    (out / "checkpoints" / "step00000040").mkdir(parents=True)
    trainer = CRASH_TRAINER.format(saves="step00000050", out=shlex.quote(str(out)), code=1)
    r, calls, sd = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer, args=(f"--train.out_dir={out}",))
    assert "scontrol requeue 123456" in calls and r.returncode == 1, r.stdout + r.stderr
    assert "scontrol requeue failed" in r.stderr and len(list(sd.glob("*.json"))) == 1


def test_a_batch_shell_killed_by_a_signal_keeps_the_targets(tmp_path):
    """bash killed by a signal it does not trap (HUP) runs its EXIT trap with the last command's status, 0: the
    targets went as for a job that ended well."""
    trainer = TRAINER.replace("kill -USR1", "kill -HUP").format(line="''", log="/dev/null", code=1)
    r, _calls, sd = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer)
    assert r.returncode != 0 and len(list(sd.glob("*.json"))) == 1, r.stdout + r.stderr
