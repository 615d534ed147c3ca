"""Work in a forked process at a lower CPU priority, so that it fills the cores MMseqs2 leaves idle."""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable

NICE = 10


def _niced(nice: int, fn: Callable, args: tuple) -> None:
    if nice:
        os.nice(nice)
    fn(*args)


class Background:
    """fn(*args) in a forked process (the arguments are inherited, not pickled)."""

    def __init__(self, name: str, fn: Callable, *args, nice: int = NICE):
        self.name = name
        self._proc = mp.get_context("fork").Process(target=_niced, args=(nice, fn, args), name=name)
        self._proc.start()

    def join(self) -> None:
        self._proc.join()
        if self._proc.exitcode != 0:
            raise RuntimeError(f"the {self.name} process failed (exit code {self._proc.exitcode}); "
                               "see its traceback above")

    def stop(self) -> None:
        """The build failed or ended early: end the process."""
        self._proc.kill()
        self._proc.join()
