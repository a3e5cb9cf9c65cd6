"""The first layer on sparse input on the GPU: gpubp's own CSR kernel (``kernels/sparse.cu``).

A batch's rows ``X`` ``(B, n_0)`` are cut from the user's matrix on the host (scipy CSR), and
transposed there too (``X.T`` ``(n_0, B)`` in CSR); both are uploaded (row pointers as int64,
column indices as int32, values in the model's dtype). One kernel, ``csr_dense``, computes both
products of :mod:`gpubp.backends.sparse`:

    z^1    = X   @ W^1.T      (B, n_0) @ (n_0, n_1)    one block per row of X
    dW^1.T = X.T @ delta^1    (n_0, B) @ (B, n_1)      one block per row of X.T (a feature)

each output value one thread's sum in the CSR order, so the gradient needs no atomics and is
the same bit for bit on every run; then the bias and activation kernel on ``z^1``. The weights
are read, and the gradient written, through strides: ``(n_0, n_1)`` storage or gpubp's
``(n_1, n_0)`` alike, without a copy. This is what the emulated GPU tests; it runs unchanged on
a real one (``cupyx.scipy.sparse`` is not used, so the emulator and the GPU run the same code).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..sparse import CsrBatch
from . import catalogue as ck
from . import launch

_INT32_MAX = 2**31 - 1


class DeviceCsr:
    """One CSR matrix ``(rows, cols)`` on the device: ``indptr`` int64 ``(rows + 1,)``,
    ``indices`` int32 ``(nnz,)``, ``data`` ``(nnz,)`` (a one-element dummy each when empty)."""

    def __init__(self, cp: Any, csr: Any, dtype: Any) -> None:
        if csr.shape[1] > _INT32_MAX:
            raise ValueError(f"a sparse input of {csr.shape[1]} columns; at most 2**31 - 1")
        self.shape = (int(csr.shape[0]), int(csr.shape[1]))
        self.indptr = cp.asarray(np.asarray(csr.indptr, dtype=np.int64))
        nnz = max(int(csr.nnz), 1)  # a kernel argument is never a zero-size allocation
        indices = np.zeros(nnz, dtype=np.int32)
        data = np.zeros(nnz, dtype=dtype)
        indices[: csr.nnz] = csr.indices
        data[: csr.nnz] = csr.data
        self.indices = cp.asarray(indices)
        self.data = cp.asarray(data)


def _strided(a: Any, what: str) -> tuple[Any, int, int]:
    """``(base, s0, s1)``: a C-contiguous array holding ``a`` ``(m, n)`` and ``a[i, j]``'s
    place in it, ``i * s0 + j * s1`` (``a`` itself, or the transpose it is a view of)."""
    if a.flags.c_contiguous:
        return a, int(a.shape[1]), 1
    if a.T.flags.c_contiguous:
        return a.T, 1, int(a.shape[0])
    raise ValueError(f"csr_dense: {what} must be C-contiguous or the transpose of such an array")


def csr_dense(kernels: launch.KernelGetter, m: DeviceCsr, w: Any, out: Any) -> None:
    """``out = m @ w``: CSR ``(rows, K)`` times ``w`` ``(K, n)``, into ``out`` ``(rows, n)``.

    ``w`` and ``out`` are C-contiguous or transposed views of C-contiguous arrays, of one float
    dtype, ``m.data``'s.
    """
    dt = m.data.dtype
    rows, K = m.shape
    if tuple(w.shape[:1]) != (K,) or w.ndim != 2 or w.dtype != dt:
        raise ValueError(f"csr_dense: w is {w.dtype} {tuple(w.shape)}; expected {dt} ({K}, n)")
    n = int(w.shape[1])
    if tuple(out.shape) != (rows, n) or out.dtype != dt:
        raise ValueError(
            f"csr_dense: out is {out.dtype} {tuple(out.shape)}; expected ({rows}, {n})"
        )
    wb, w_j, w_c = _strided(w, "w")
    ob, o_r, o_c = _strided(out, "out")
    if rows == 0 or n == 0:
        return
    kernels(ck.csr_dense(dt))(
        (min(rows, 65536),),
        (ck.reduction_threads(n),),
        (m.indptr, m.indices, m.data, np.int64(rows), wb, np.int64(w_j), np.int64(w_c),
         np.int32(n), ob, np.int64(o_r), np.int64(o_c)),
    )  # fmt: skip


class CudaSparseOps:
    """:class:`~gpubp.backends.sparse.SparseOps` on the GPU; a mixin of
    :class:`~gpubp.backends.cuda.CupyBackend` (which provides ``_cp``, ``kernel`` and
    ``scratch_status``)."""

    _cp: Any

    def kernel(self, name: str) -> Any:
        raise NotImplementedError  # pragma: no cover - CupyBackend's

    def scratch_status(self) -> Any:
        raise NotImplementedError  # pragma: no cover - CupyBackend's

    def sparse_batch(self, x: Any, dtype: Any) -> CsrBatch:
        """``x`` as a :class:`CsrBatch` whose ``device`` holds ``(X, X.T)`` uploaded as
        :class:`DeviceCsr`."""
        batch = CsrBatch(x, dtype)
        dt = np.dtype(dtype)
        batch.device = (
            DeviceCsr(self._cp, batch.x, dt),
            DeviceCsr(self._cp, batch.transposed(), dt),
        )
        return batch

    def _device_csr(self, x: CsrBatch, k: int) -> DeviceCsr:
        if x.device is None:  # a batch made by another backend: upload it now
            x = self.sparse_batch(x.x, x.dtype)
        return x.device[k]

    def sparse_forward_layer(
        self, x: CsrBatch, Wt: Any, b: Any, activation: str, *, out: Any = None
    ) -> Any:
        """``a = f(X @ Wt + b)`` ``(B, n_0) @ (n_0, n_1) + (n_1,) -> (B, n_1)``: the CSR kernel,
        then the bias and activation kernel in place."""
        m = self._device_csr(x, 0)
        if out is None:
            out = self._cp.empty((m.shape[0], Wt.shape[1]), dtype=Wt.dtype)
        csr_dense(self.kernel, m, Wt, out)
        launch.bias_activation(self.kernel, out, b, activation, self.scratch_status())
        return out

    def sparse_weight_gradient(self, x: CsrBatch, delta: Any, *, out: Any = None) -> Any:
        """``dW^1.T = X.T @ delta`` ``(n_0, B) @ (B, n_1) -> (n_0, n_1)`` by the CSR kernel over
        ``X.T`` (one block per feature; no atomics); ``out`` may be a transposed view."""
        m = self._device_csr(x, 1)
        if out is None:
            out = self._cp.empty((m.shape[0], delta.shape[1]), dtype=delta.dtype)
        csr_dense(self.kernel, m, self._cp.ascontiguousarray(delta), out)
        return out
