"""Work in a forked process at a lower CPU priority, so that it fills the cores MMseqs2 leaves idle."""
from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable

NICE = 10


def _niced(fn: Callable, args: tuple) -> None:
    os.nice(NICE)
    fn(*args)


class Background:
    def __init__(self, name: str, fn: Callable, *args):
        self.name = name
        self._proc = mp.get_context("fork").Process(target=_niced, args=(fn, args), name=name)
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
