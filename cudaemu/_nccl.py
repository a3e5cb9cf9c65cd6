"""NCCL on the emulated device, over MPI (mpi4py): ``cupy.cuda.nccl``."""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import _device_id, stats
from ._memory import _addr, _check_range, _view
from ._stream import _Op, _stream_of, _submit


class NcclError(RuntimeError):
    """Stands in for ``cupy.cuda.nccl.NcclError``."""


_NCCL_TYPES: dict[int, Any] = {
    0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
    6: np.float16, 7: np.float32, 8: np.float64,
}  # fmt: skip
_NCCL_OPS = ("SUM", "PROD", "MAX", "MIN", "AVG")
_nccl_group: list[list[Callable[[], None]]] = []


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a test dependency
        raise NcclError(f"emulated NCCL runs over MPI and mpi4py is missing ({exc})") from None
    return MPI


def _nccl_get_unique_id() -> tuple[int, ...]:
    return tuple(int(b) - 128 for b in os.urandom(128))  # CuPy: a tuple of 128 C chars


class NcclCommunicator:
    """``NcclCommunicator(ndev, unique_id, rank)``: the ranks that pass the same id, over MPI.

    Made collectively by every rank of ``MPI.COMM_WORLD`` (the id decides the group, the rank
    the order); two ranks of a group on one emulated device are refused, as NCCL refuses them.
    """

    def __init__(self, ndev: int, commId: Any, rank: int) -> None:
        MPI = _mpi()
        uid = bytes((int(c) + 128) % 256 for c in commId)
        if len(uid) != 128:
            raise NcclError("ncclInvalidArgument: the unique id is not 128 bytes")
        color = int.from_bytes(uid[:4], "little") & 0x7FFFFFFF
        self._comm = MPI.COMM_WORLD.Split(color, int(rank))
        self._MPI = MPI
        self.ndev, self.rank = int(ndev), int(rank)
        self.dev = _device_id[0]
        if self._comm.Get_size() != self.ndev or self._comm.Get_rank() != self.rank:
            raise NcclError(
                f"ncclInvalidUsage: {self._comm.Get_size()} ranks joined with this id, ndev is "
                f"{self.ndev}; ranks must be 0..ndev-1 and each given once"
            )
        where = self._comm.allgather((MPI.Get_processor_name(), self.dev))
        if len(set(where)) != len(where):
            raise NcclError(
                f"ncclInvalidUsage: Duplicate GPU detected ({where}): each rank needs its own "
                "device (the emulator has GPUBP_EMU_DEVICES devices, default 1)"
            )

    def size(self) -> int:
        return self.ndev

    def rank_id(self) -> int:
        return self.rank

    def device_id(self) -> int:
        return self.dev

    def destroy(self) -> None:
        if self._comm is not None:
            self._comm.Free()
            self._comm = None

    abort = destroy

    def _collective(self, name: str, stream: Any, body: Callable[[], None]) -> None:
        if self._comm is None:
            raise NcclError("ncclInvalidUsage: the communicator was destroyed")
        s = _stream_of(stream)
        op = _Op("nccl", name, body)
        if _nccl_group:
            _nccl_group[-1].append(lambda: _submit(s, op))
        else:
            _submit(s, op)

    def allReduce(
        self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: Any
    ) -> None:
        dtype, mpi_op = self._types(datatype, op)
        send, recv, count = _addr(sendbuf), _addr(recvbuf), int(count)
        nbytes = count * dtype.itemsize

        def body() -> None:
            _check_range(recv, nbytes, "ncclAllReduce: recvbuf")
            r = _view(recv, dtype, count, 1, max(1, count))[:, 0]
            if send == recv:
                self._comm.Allreduce(self._MPI.IN_PLACE, r, op=mpi_op)
            else:
                _check_range(send, nbytes, "ncclAllReduce: sendbuf")
                s = _view(send, dtype, count, 1, max(1, count))[:, 0].copy()
                self._comm.Allreduce(s, r, op=mpi_op)
            if _NCCL_OPS[int(op)] == "AVG":
                r /= self.ndev
            stats["allreduce"] += 1

        self._collective(f"allReduce {count} x {dtype.name}", stream, body)

    def broadcast(
        self, sendbuf: int, recvbuf: int, count: int, datatype: int, root: int, stream: Any
    ) -> None:
        dtype, _ = self._types(datatype, 0)
        send, recv, count = _addr(sendbuf), _addr(recvbuf), int(count)

        def body() -> None:
            _check_range(recv, count * dtype.itemsize, "ncclBroadcast: recvbuf")
            r = _view(recv, dtype, count, 1, max(1, count))[:, 0]
            if self.rank == int(root) and send != recv:
                r[...] = _view(send, dtype, count, 1, max(1, count))[:, 0]
            self._comm.Bcast(r, root=int(root))

        self._collective(f"broadcast {count} x {dtype.name}", stream, body)

    def bcast(self, buff: int, count: int, datatype: int, root: int, stream: Any) -> None:
        self.broadcast(buff, buff, count, datatype, root, stream)

    def _types(self, datatype: int, op: int) -> tuple[np.dtype[Any], Any]:
        if int(datatype) not in _NCCL_TYPES:
            raise NcclError(f"ncclInvalidArgument: datatype {datatype}")
        if not 0 <= int(op) < len(_NCCL_OPS):
            raise NcclError(f"ncclInvalidArgument: op {op}")
        name = _NCCL_OPS[int(op)]
        return np.dtype(_NCCL_TYPES[int(datatype)]), getattr(
            self._MPI, "SUM" if name == "AVG" else name
        )


def _nccl_group_start() -> None:
    _nccl_group.append([])


def _nccl_group_end() -> None:
    if not _nccl_group:
        raise NcclError("ncclInvalidUsage: groupEnd without groupStart")
    for call in _nccl_group.pop():
        call()


def _cupy_nccl() -> types.ModuleType:
    mod = types.ModuleType("cupy.cuda.nccl", "NCCL emulated over MPI (mpi4py).")
    values: dict[str, Any] = {
        "NcclCommunicator": NcclCommunicator,
        "NcclError": NcclError,
        "get_unique_id": _nccl_get_unique_id,
        "groupStart": _nccl_group_start,
        "groupEnd": _nccl_group_end,
        "get_version": lambda: 22000,
        "get_build_version": lambda: 22000,
        "available": True,
    }
    names = ("INT8", "UINT8", "INT32", "UINT32", "INT64", "UINT64", "FLOAT16", "FLOAT32")
    for i, t in enumerate((*names, "FLOAT64")):
        values[f"NCCL_{t}"] = i
    values.update(NCCL_CHAR=0, NCCL_INT=2, NCCL_HALF=6, NCCL_FLOAT=7, NCCL_DOUBLE=8)
    for i, op in enumerate(_NCCL_OPS):
        values[f"NCCL_{op}"] = i
    for name, value in values.items():
        setattr(mod, name, value)
    return mod
