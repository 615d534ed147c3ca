"""Work in a forked process at a lower CPU priority, so that it fills the cores MMseqs2 leaves idle; and the
parent-death signal that ends every helper process (these, MMseqs2) when the build process dies."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
from collections.abc import Callable

from .errors import DataprepError

NICE = 10
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # loaded before any fork


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Called in a new child of process `parent` (a pid): the kernel sends it `sig` when the parent dies, even by
    SIGKILL or the OOM killer, so that no helper keeps running (and writing into OUT/.work) without the build.
    Linux only (elsewhere nothing); the parent must be the process's main thread, as it is here."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig))
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)


def _niced(errors, parent: int, nice: int, fn: Callable, args: tuple) -> None:
    try:
        die_with_parent(parent)
        if nice:
            os.nice(nice)
        fn(*args)
    except BaseException as exc:
        try:
            errors.send(exc)
        except (pickle.PicklingError, TypeError, AttributeError):
            errors.send(RuntimeError(f"{type(exc).__name__}: {exc}"))
        if isinstance(exc, DataprepError):  # the message says it all, and the caller prints it
            sys.exit(1)
        raise                               # a bug: its traceback on stderr too
    finally:
        errors.close()


class Background:
    """fn(*args) in a forked process (the arguments are inherited, not pickled); `join` raises what it raised.

    A pipe, not a multiprocessing queue or pool, carries the exception back: a process killed while it holds a
    queue's lock (Pool.terminate after another share failed) leaves that lock taken, and the pool's shutdown
    then waits for it for ever."""

    def __init__(self, name: str, fn: Callable, *args, nice: int = NICE):
        self.name = name
        ctx = mp.get_context("fork")
        self._errors, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_niced, args=(child, os.getpid(), nice, fn, args), name=name)
        self._proc.start()
        child.close()

    def join(self) -> None:
        try:
            error = self._errors.recv()      # before join(): a large exception could fill the pipe
        except EOFError:                     # ended without one
            error = None
        self._proc.join()
        if error is not None:
            raise error
        if self._proc.exitcode != 0:
            raise RuntimeError(f"the {self.name} process failed (exit code {self._proc.exitcode}); "
                               "see its traceback above")

    def stop(self) -> None:
        """The build failed or ended early: end the process."""
        self._proc.kill()
        self._proc.join()
