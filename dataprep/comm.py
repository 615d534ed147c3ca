"""The few collective operations the pipeline needs, for one process or for MPI ranks (mpi4py)."""
from __future__ import annotations

from typing import Any


class SerialComm:
    rank, size = 0, 1

    def barrier(self) -> None:
        pass

    def bcast(self, obj: Any) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def abort(self, code: int) -> None:
        raise SystemExit(code)


class MpiComm:
    """COMM_WORLD of mpi4py; every rank must reach the same collectives in the same order."""

    def __init__(self):
        from mpi4py import MPI

        self._c = MPI.COMM_WORLD
        self.rank, self.size = self._c.Get_rank(), self._c.Get_size()

    def barrier(self) -> None:
        self._c.barrier()

    def bcast(self, obj: Any) -> Any:
        return self._c.bcast(obj, root=0)

    def allgather(self, obj: Any) -> list[Any]:
        return self._c.allgather(obj)

    def gather(self, obj: Any) -> list[Any] | None:
        return self._c.gather(obj, root=0)

    def abort(self, code: int) -> None:
        self._c.Abort(code)
