"""A large batch split by rows over threads, each part running the whole forward and backward pass.

The Numba backend's elementwise passes are serial (only the batch gather and the optimizer
update run on the pool's threads), so between the GEMMs (which BLAS runs on every core) they
run on one core. A large batch (at least
:attr:`RowSplit.split_min_rows` rows per thread) is therefore split by rows over the threads
instead: each part runs the whole forward and backward pass on its rows, with BLAS at one
thread, in a persistent Python thread pool whose idle threads sleep on a queue, and the parts'
``dW``, ``db`` and loss are added at the end. So the elementwise passes run on every core too
(measured on 2 cores: a 16384-row batch of 64-wide layers from 1.4x to 0.9x the GEMM-only time;
splitting pays from about 2048 rows per thread).

A split step that starts within about 0.1 s of a multi-threaded BLAS call elsewhere in the
process shares a core with OpenBLAS's idle threads, which spin that long before they sleep (up
to 2x slower); ``OPENBLAS_THREAD_TIMEOUT=4`` in the environment before NumPy is imported avoids
it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, ClassVar

import numpy as np

from . import gemm as numba_blas
from . import kernels as K
from . import layers
from .workspace import NumbaWorkspace


class RowSplit:
    """The row split of :class:`~.backend.NumbaBackend` (a mixin): how many parts a batch
    takes, the thread pool they run in, and one part's passes.

    The host sets ``threads`` (``None``: as many as BLAS has) and ``blas_in_kernels``.
    """

    #: Fewest batch rows per thread for a batch to be split over threads (see :meth:`_parts`).
    split_min_rows: ClassVar[int] = 2048
    threads: int | None
    blas_in_kernels: bool
    _pool: ThreadPoolExecutor | None = None
    _pool_workers: int = 0

    def _parts(self, batch: int) -> int:
        """How many threads share the gradients of a batch of ``batch`` rows (1: not split).

        As many as BLAS would use (``threads``, or BLAS's own setting when it is None), as long
        as each gets at least :attr:`split_min_rows` rows; 1 when BLAS's thread count cannot be
        set (it must be 1 while the parts run) or the GEMMs go through ``numpy.matmul``.
        """
        if not self.blas_in_kernels or batch < 2 * self.split_min_rows:
            return 1
        current = numba_blas.blas_threads()
        if current is None:
            return 1
        n = self.threads if self.threads is not None else current
        return max(1, min(n, batch // self.split_min_rows))

    def _executor(self, workers: int) -> ThreadPoolExecutor:
        """A persistent pool of ``workers`` threads (idle threads sleep on a queue: no spinning)."""
        if self._pool is None or self._pool_workers < workers:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="gpubp-numba")
            self._pool_workers = workers
        return self._pool

    def _split_gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        staged: tuple[NumbaWorkspace, Any, Any, Any],
        ids: tuple[int, int, int],
        parts: int,
    ) -> float:
        """Gradients with the batch split by rows over ``parts`` threads, BLAS at 1 thread.

        ``staged`` is ``(ws, a0, labels, Y)``: the workspace with the batch's input ``a0`` and
        its targets (``labels`` or ``Y``) in it; ``ids`` are the hidden activation's, the
        output's and the loss's kernel ids. The gradients land in ``ws.dW`` and ``ws.db``; the
        loss is returned.

        Part ``t`` (rows ``[t B / parts, (t + 1) B / parts)`` of every workspace buffer) runs
        the whole forward and backward pass on its rows, in the calling thread for ``t = 0``
        and in the pool for the others; the kernels release the GIL. Each part writes its own
        ``dW = delta.T @ a_prev`` and ``db`` (part 0 straight into the workspace's), and its
        loss term is its rows' sum over ``B``; the parts' gradients are then added. Every
        elementwise pass and GEMM thus runs on all cores, and with narrow layers
        single-threaded GEMMs on half the rows are faster than a two-threaded GEMM on all
        of them (the ``delta.T @ a_prev`` reduction over ``B`` scales worst).
        """
        ws, a0, labels, Y = staged
        B = ws.batch
        rows = [B * t // parts for t in range(parts + 1)]
        grads = [(ws.dW, ws.db), *ws.partial_buffers(parts)]
        before = numba_blas.blas_threads()
        numba_blas.set_blas_threads(1)
        try:
            pool = self._executor(parts - 1)
            futures = [
                pool.submit(
                    self._part,
                    weights,
                    biases,
                    ws,
                    a0,
                    Y,
                    labels,
                    ids,
                    rows[t],
                    rows[t + 1],
                    *grads[t],
                )
                for t in range(1, parts)
            ]
            try:
                value = self._part(weights, biases, ws, a0, Y, labels, ids, 0, rows[1], *grads[0])
            finally:
                wait(futures)
            for f in futures:
                value += f.result()
        finally:
            if before is not None:
                numba_blas.set_blas_threads(before)
        for dWs, dbs in grads[1:]:
            for i in range(len(weights)):
                np.add(ws.dW[i], dWs[i], out=ws.dW[i])
                np.add(ws.db[i], dbs[i], out=ws.db[i])
        return value

    @staticmethod
    def _part(
        weights: list[Any],
        biases: list[Any],
        ws: NumbaWorkspace,
        a0: Any,
        Y: Any,
        labels: Any,
        ids: tuple[int, int, int],
        r0: int,
        r1: int,
        dW: list[Any],
        db: list[Any],
    ) -> float:
        """Forward, output delta and backward for rows ``[r0, r1)``; ``dW``, ``db`` of these
        rows; returns their loss sum over the whole batch ``B``."""
        # BLAS at one thread in this thread too: MKL's count is per thread (its own setting)
        numba_blas.set_blas_threads(1)
        L = len(weights)
        aid, oid, lid = ids
        acts = [a0[r0:r1], *(a[r0:r1] for a in ws.a[1:])]
        z = ws.z_out[r0:r1]
        none = ws.no_db
        for i in range(L - 1):
            layers.forward_layer(acts[i], weights[i], biases[i], aid, acts[i + 1], none)
        layers.forward_layer(acts[L - 1], weights[L - 1], biases[L - 1], 0, z, none)
        value, _ = K.output_delta(z, Y[r0:r1], labels[r0:r1], oid, lid, z, db[L - 1], ws.batch)
        delta = z
        for i in range(L - 1, -1, -1):
            layers.weight_gradient(delta, acts[i], dW[i], 1.0, 0.0)
            if i > 0:
                d = ws.d[i][r0:r1]
                layers.hidden_delta(delta, weights[i], acts[i], aid, d, db[i - 1], none)
                delta = d
        return float(value)
