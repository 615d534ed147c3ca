"""dataprep.background: forked helper processes report their errors through join() and can be stopped."""
from __future__ import annotations

import os
import signal
import time

import pytest

from dataprep.background import Background
from dataprep.errors import InputError


def bad_record(path: str) -> None:
    raise InputError(f"{path}: line 7: record 'x' has a binary byte 0x00")


def unpicklable_failure() -> None:
    class Local(Exception):  # a class defined in a function cannot be pickled
        pass

    raise Local("from a local class")


def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_named_error_comes_back_from_join_with_its_message_and_no_traceback(capfd):
    proc = Background("normalise share 1", bad_record, "in.fa", nice=0)
    with pytest.raises(InputError, match=r"in\.fa: line 7: record 'x' has a binary byte"):
        proc.join()
    assert "Traceback" not in capfd.readouterr().err


def test_an_unpicklable_error_comes_back_as_its_text():
    with pytest.raises(RuntimeError, match="Local: from a local class"):
        Background("x", unpicklable_failure, nice=0).join()


def test_a_killed_process_is_named_with_its_exit_code():
    with pytest.raises(RuntimeError, match=r"the shuffle process failed \(exit code -9\)"):
        Background("shuffle", killed, nice=0).join()
    with pytest.raises(RuntimeError, match=r"the exit process failed \(exit code 1\)"):  # ended with no error sent
        Background("exit", os._exit, 1, nice=0).join()


def write_niceness(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(os.nice(0)))


def test_the_process_runs_at_a_lower_priority(tmp_path):
    """It fills the cores MMseqs2 leaves idle rather than competing with it."""
    Background("niced", write_niceness, str(tmp_path / "nice"), nice=5).join()
    assert int((tmp_path / "nice").read_text()) == min(os.nice(0) + 5, 19)


def test_stop_ends_a_running_process_and_join_of_a_good_one_returns():
    Background("ok", time.sleep, 0, nice=0).join()
    slow = Background("slow", time.sleep, 60, nice=0)
    t = time.monotonic()
    slow.stop()
    assert time.monotonic() - t < 10 and slow._proc.exitcode == -signal.SIGKILL
