"""Data-parallel training over MPI (NumPy and Numba backends) and NCCL (CuPy backend).

Every rank holds the whole model and the whole dataset, draws the same shuffled order, and takes
a disjoint contiguous shard of every global batch of ``G`` samples. Rank ``r`` computes the
gradient of the mean loss over its ``g_r`` samples and scales it by ``g_r / G``; the sum over
ranks is then the gradient of the mean loss over the global batch::

    dC/dW = sum_r (g_r / G) * dC_r/dW          C = sum_r (g_r / G) * C_r

so ``N`` ranks with global batch ``G`` follow the same trajectory as one process with batch
``G`` (up to the order of floating-point additions). All gradients travel in one flat buffer
(split into buckets of at most :data:`BUCKET_ELEMENTS` values), together with the batch loss and
a stop flag, in one Allreduce per step: one message per bucket, not one per tensor. Each rank
then applies the identical update, so parameters stay identical; :meth:`DataParallel.check_in_sync`
compares a checksum across ranks and raises if they ever differ.

Run it with ``mpirun -n N gpubp train --distributed ...``. MPI comes from the system (Open MPI:
``apt-get install openmpi-bin``), mpi4py from PyPI (``pip install 'gpubp[mpi]'``).
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from typing import Any

import numpy as np

from .backends.cores import usable_cores
from .errors import DistributedError
from .gather import BatchGather

__all__ = [
    "BUCKET_ELEMENTS",
    "DataParallel",
    "DistributedError",
    "MPICommunicator",
    "init",
    "local_rank",
    "shard_bounds",
]

#: Largest number of values one Allreduce carries (64 MiB of float32).
BUCKET_ELEMENTS = 1 << 24


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except Exception as exc:  # not installed (ImportError), or no MPI library to load
        raise DistributedError(
            "distributed training needs mpi4py and an MPI runtime: pip install 'gpubp[mpi]' "
            "(or pip install mpi4py) and apt-get install openmpi-bin (or your cluster's MPI "
            f"module); then launch with mpirun -n N gpubp train --distributed ({exc})"
        ) from None
    return MPI


class MPICommunicator:
    """The few collective operations training needs, over an mpi4py communicator."""

    def __init__(self, comm: Any = None) -> None:
        self.MPI = _import_mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()

    def allreduce_sum(self, buf: np.ndarray) -> None:
        """Sum ``buf`` (a contiguous NumPy array) over all ranks, in place."""
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def allgather(self, value: Any) -> list[Any]:
        return list(self.comm.allgather(value))

    def bcast(self, value: Any, root: int = 0) -> Any:
        return self.comm.bcast(value, root=root)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (no rank is left waiting in a collective)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


def _nccl_module(cupy: Any) -> Any:
    """CuPy's NCCL module; ImportError where NCCL is not there (``available`` false)."""
    nccl = getattr(cupy.cuda, "nccl", None)
    if nccl is None:  # CuPy imports cupy.cuda.nccl only when asked
        nccl = importlib.import_module(f"{cupy.__name__}.cuda.nccl")
    if getattr(nccl, "available", True) is False:
        raise ImportError("CuPy was built with NCCL support but found no NCCL library")
    return nccl


def _nccl_missing(cupy: Any, why: str | None) -> str:
    """The error text for NCCL missing or broken: why, and the pip package of CuPy's CUDA."""
    try:
        major = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        major = 12
    return (
        f"data-parallel training on the cupy backend needs NCCL, which could not be used ({why}); "
        f"install it with pip install nvidia-nccl-cu{major} (NCCL is not in CuPy's [ctk] "
        "extra), or train on one GPU without --distributed"
    )


class _NCCLReducer:
    """Sum a CuPy buffer over ranks with NCCL; the unique id travels over MPI.

    The code follows CuPy's ``cupy.cuda.nccl`` API; the tests run it on the emulated GPU, whose
    NCCL maps onto MPI.
    """

    def __init__(self, comm: MPICommunicator, cupy: Any) -> None:
        uid, why = None, None
        try:
            nccl = _nccl_module(cupy)
            if comm.rank == 0:
                uid = nccl.get_unique_id()
        except Exception as exc:  # NCCL missing or broken: AttributeError, ImportError, ...
            nccl, why = None, f"{type(exc).__name__}: {exc}"
        # every rank learns rank 0's outcome (none is left waiting for an id that never comes)
        uid, why0 = comm.bcast((uid, why))
        why = why or why0
        if nccl is None or why is not None:
            raise DistributedError(_nccl_missing(cupy, why))
        self.cupy, self.nccl = cupy, nccl
        try:
            self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        except Exception as exc:
            raise DistributedError(_nccl_missing(cupy, f"{type(exc).__name__}: {exc}")) from exc

    def allreduce_sum(self, buf: Any) -> None:
        nccl = self.nccl
        dtype = nccl.NCCL_FLOAT32 if buf.dtype == np.float32 else nccl.NCCL_FLOAT64
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, nccl.NCCL_SUM, stream)


def init(comm: Any = None) -> MPICommunicator:
    """The MPI communicator of this job (rank, size and collectives); raises
    :class:`DistributedError` saying what to install when mpi4py or MPI is missing.

    Where CuPy sees GPUs, each rank also takes its own: device ``local_rank % n_devices``,
    ``local_rank`` being the rank among the ranks on this node (NCCL refuses two ranks on one
    GPU). Call it before any model is built.
    """
    c = MPICommunicator(comm)
    _use_local_gpu(c)
    return c


def local_rank(comm: MPICommunicator) -> int:
    """This rank's index among the ranks on the same node (shared-memory domain)."""
    node = comm.comm.Split_type(comm.MPI.COMM_TYPE_SHARED)
    try:
        return int(node.Get_rank())
    finally:
        node.Free()


def _use_local_gpu(comm: MPICommunicator) -> None:
    try:
        from .backends.cuda.cupy_module import import_cupy

        cupy = import_cupy()
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no GPU: CPU ranks, nothing to choose
        return
    if n > 0:
        cupy.cuda.Device(local_rank(comm) % n).use()


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items; the first ``n % size``
    ranks take one more, so shares differ by at most one and some may be empty."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _limit_blas_threads(size: int, backend: Any) -> str | None:
    """Give each of the ``size`` ranks on this node its share of the cores this process may use
    (BLAS threads, and a Numba backend's own thread setting, which it applies to every call),
    so ranks do not oversubscribe the machine; returns a note for the log, or None."""
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", size))
    threads = max(1, usable_cores() // max(local, 1))
    launched = "OMPI_COMM_WORLD_LOCAL_SIZE" in os.environ  # a rank process of its own
    if launched and getattr(backend, "threads", None) is not None:
        # numba: its calls set their own count (the rank's backend is this process's only one)
        backend.threads = min(int(backend.threads), threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the other BLAS libraries keep their setting
        pass
    else:
        threadpool_limits(limits=threads, user_api="blas")
    return f"BLAS threads per rank: {threads} ({local} ranks on this node)"


class DataParallel:
    """One model replica per rank; :meth:`step` is a data-parallel train step.

    Parameters
    ----------
    comm : MPICommunicator
        From :func:`init`.
    model : MLP
        This rank's replica; every rank must build it identically (same seed).
    limit_threads : bool
        Cap BLAS threads per rank at cores / ranks-on-this-node (CPU backends).
    """

    def __init__(self, comm: MPICommunicator, model: Any, limit_threads: bool = True) -> None:
        self.comm, self.model = comm, model
        self.rank, self.size = comm.rank, comm.size
        be = model.backend
        self.shapes: list[tuple[int, ...]] = model.parameter_shapes
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
        n = self.offsets[-1]
        # the flat buffer: every gradient, then the loss share, the stop flag and a slot where
        # the backend's update may put its verdict (Backend.reduced_update)
        self.flat = be.zeros((n + 3,), model.dtype)
        self.grads = [
            self.flat[self.offsets[i] : self.offsets[i + 1]].reshape(s)
            for i, s in enumerate(self.shapes)
        ]
        self._reducer: Any = comm
        self._host: np.ndarray | None = None
        if be.name == "cupy":
            self._reducer = _NCCLReducer(comm, be.xp)
        elif not isinstance(self.flat, np.ndarray):
            self._host = np.empty(self.flat.shape, self.flat.dtype)
        if be.name == "cupy":
            self.note: str | None = "gradients all-reduced by NCCL, one GPU per rank"
        else:
            self.note = _limit_blas_threads(self.size, be) if limit_threads else None
        self.stop_agreed = False
        self._gather: Any = None  # the shard's rows, gathered into buffers kept step to step
        self.check_in_sync("the initial parameters")

    def _rows(self, X: Any, Y: Any, shard: Any) -> tuple[Any, Any]:
        """``(X[shard], Y[shard])`` gathered into the backend's batch buffers (on the GPU the
        train step's own input buffers: no allocation and no staging copy), kept for these
        ``X``, ``Y`` and shards of at most this many rows."""
        g, k = self._gather, int(shard.shape[0])
        if g is None or g.X is not X or g.Y is not Y or k > g.batch_size:
            be = self.model.backend
            g = self._gather = BatchGather(X, Y, k, xp=be.xp, buffers=be.batch_buffers)
        return g(shard)

    def _allreduce(self) -> None:
        buf = self.flat
        if self._host is not None:  # a device array on a backend without a device collective
            self._host[...] = self.model.backend.to_numpy(buf)
            buf = self._host
        for start in range(0, buf.size, BUCKET_ELEMENTS):
            self._reducer.allreduce_sum(buf[start : start + BUCKET_ELEMENTS])
        if self._host is not None:
            self.flat[...] = self.model.backend.asarray(self._host)

    def step(self, X: Any, Y: Any, idx: Any, optimizer: Any, stop: bool = False) -> float:
        """One step on the global batch ``X[idx], Y[idx]``: this rank's shard, gradients summed
        over ranks, the same update everywhere. Returns the global batch's mean loss.

        ``stop`` is this rank's wish to stop; afterwards :attr:`stop_agreed` is True on every
        rank if any rank wished it, so all ranks stop after the same step.
        """
        model, be = self.model, self.model.backend
        W, b = model.parameters
        G = int(idx.shape[0])
        lo, hi = shard_bounds(G, self.rank, self.size)
        n = self.offsets[-1]
        scratch = None
        if hi > lo:
            x, y = self._rows(X, Y, idx[lo:hi])
            spec = (model.activation, model.output, model.loss)
            # the scaled gradients and loss share into the flat buffer, on the device
            be.shard_gradients(W, b, x, y, spec, (hi - lo) / G, self.grads, self.flat[n:])
            scratch = be.workspace_for(W, x).pscratch
        else:  # fewer samples than ranks in this batch: this rank contributes nothing
            self.flat[...] = 0
        self.flat[n + 1 :] = 0.0
        if stop:
            self.flat[n + 1] = 1.0
        self._allreduce()
        state = optimizer.bind(model, be, self.shapes, model.dtype)
        # the same loss and gradients on every rank, so the same verdict and the same update;
        # the loss, the stop flag and the update's verdict come back in one read
        tail = be.reduced_update(
            self.flat[n:], [*W, *b], list(self.grads), optimizer, state, scratch=scratch
        )
        self.stop_agreed = float(tail[1]) > 0
        return float(tail[0])

    def checksum(self) -> int:
        """CRC-32 of this rank's parameters, bit for bit."""
        crc = 0
        W, b = self.model.parameters
        for p in [*W, *b]:
            crc = zlib.crc32(np.ascontiguousarray(self.model.backend.to_numpy(p)).data, crc)
        return crc

    def check_in_sync(self, when: str) -> None:
        """Raise :class:`DistributedError` on every rank if the ranks' parameters differ."""
        sums = self.comm.allgather(self.checksum())
        if len(set(sums)) > 1:
            raise DistributedError(
                f"the ranks' parameters differ after {when} (checksums "
                f"{', '.join(f'{s:08x}' for s in sums)}): every rank must build the model with "
                "the same seed and options, and run the same backend and dtype"
            )


def predict_step_seconds(
    n_params: int,
    global_batch: int,
    ranks: int,
    flops_per_second: float,
    bandwidth: float,
    latency: float,
    bytes_per_value: int = 4,
) -> dict[str, float]:
    """The cost model of one data-parallel step (no overlap of compute and communication).

    compute = 6 P G / (N F)        three GEMMs per layer (forward, delta, dW), 2 flops per MAC
    allreduce = 2 (N-1)/N * P b / W + 2 (N-1) alpha     ring Allreduce of the P-value bucket

    ``P`` parameters, global batch ``G``, ``N`` ranks of ``F`` flop/s each, link bandwidth
    ``W`` bytes/s per rank, per-message latency ``alpha`` seconds, ``b`` bytes per value.
    Returns the two terms, their sum, the speed-up over one rank, and samples/s.
    """
    compute = 6.0 * n_params * global_batch / (ranks * flops_per_second)
    comm = 0.0
    if ranks > 1:
        comm = 2.0 * (ranks - 1) / ranks * n_params * bytes_per_value / bandwidth
        comm += 2.0 * (ranks - 1) * latency
    one = 6.0 * n_params * global_batch / flops_per_second
    total = compute + comm
    return {
        "compute": compute,
        "allreduce": comm,
        "step": total,
        "speedup": one / total,
        "efficiency": one / total / ranks,
        "samples_per_second": global_batch / total,
    }
