"""A batch's rows gathered into buffers reused from step to step: :class:`BatchGather`, the
training loops' per-step gather (host or device)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class BatchGather:
    """A batch's rows, ``(X[idx], Y[idx])``, gathered into buffers reused from step to step.

    ``X`` is ``(N, n_0)`` and ``Y`` ``(N,)`` or ``(N, n_L)``; ``idx`` holds
    ``B <= min(batch_size, N)`` row indices in ``[0, N)``. For NumPy arrays (the CPU backends)
    the rows are copied with ``np.take(..., out=)`` into one ``(min(batch_size, N), ...)``
    buffer per array (a batch size beyond the data costs no more than the data), allocated on
    first use, and the batch is its first ``B`` rows: no allocation and no fresh pages per
    step, where ``X[idx]`` allocates ``B * n_0`` new values every step. The returned arrays are
    views of the buffers, overwritten by the next call: a step must be done with them (the CPU
    backends are synchronous) before the next batch is gathered. Arrays on a device, given
    their array module ``xp``, are gathered the same way there: the host indices (checked on
    the host) uploaded into one reused device index buffer, then ``xp.take(..., out=)`` into
    reused device buffers, all queued in stream order (no allocation, no host wait; a step
    queued on the same stream reads a batch before the next gather overwrites it). Those
    buffers come from ``buffers(x_shape, x_dtype, y_shape, y_dtype)`` where given (a backend's
    :meth:`~gpubp.backends.base.Backend.batch_buffers`: the CuPy backend's train step then
    reads them as its own input buffers, no staging copy), else from ``xp.empty``. Without
    ``xp``, or with device indices, ``X[idx]`` is taken there.
    """

    def __init__(
        self,
        X: Any,
        Y: Any,
        batch_size: int,
        xp: Any = None,
        buffers: Callable[[tuple[int, ...], Any, tuple[int, ...], Any], tuple[Any, Any]]
        | None = None,
    ) -> None:
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X has {X.shape[0]} rows and Y {Y.shape[0]}; expected one target row per "
                "sample of X"
            )
        self.X, self.Y = X, Y
        self.batch_size = min(int(batch_size), int(X.shape[0]))  # no more rows than there are
        self.host = isinstance(X, np.ndarray) and isinstance(Y, np.ndarray)
        self.xp: Any = None if self.host else xp
        self.buffers = buffers
        self._bufs: tuple[np.ndarray, np.ndarray] | None = None
        self._device: tuple[Any, Any, Any] | None = None  # X rows, Y rows, indices
        self._views: dict[int, tuple[Any, Any, Any]] = {}  # their first k rows, per k
        self._checked: np.ndarray | None = None  # the last order whose bounds were checked

    def __call__(self, idx: Any) -> tuple[Any, Any]:
        """``(x_b, y_b)``: rows ``idx`` of ``X`` and ``Y``."""
        if not self.host:
            if self.xp is None or not isinstance(idx, np.ndarray):
                return self.X[idx], self.Y[idx]
            return self._on_device(idx)
        idx = np.asarray(idx)
        k = int(idx.shape[0])
        if k > self.batch_size:
            raise ValueError(f"a batch of {k} rows; this gather was made for {self.batch_size}")
        if self._bufs is None:
            X, Y, B = self.X, self.Y, self.batch_size
            self._bufs = (
                np.empty((B, *X.shape[1:]), dtype=X.dtype),
                np.empty((B, *Y.shape[1:]), dtype=Y.dtype),
            )
        self._check(idx)
        xb, yb = self._bufs[0][:k], self._bufs[1][:k]
        # mode="wrap" writes straight into out (mode="raise" would gather into a temporary and
        # copy, three times slower); the bounds were checked by _check
        np.take(self.X, idx, axis=0, out=xb, mode="wrap")
        np.take(self.Y, idx, axis=0, out=yb, mode="wrap")
        return xb, yb

    def _on_device(self, idx: np.ndarray) -> tuple[Any, Any]:
        """The device gather: ``idx`` uploaded into the index buffer, rows taken into ``out``."""
        xp, X, Y = self.xp, self.X, self.Y
        k = int(idx.shape[0])
        if k > self.batch_size:
            raise ValueError(f"a batch of {k} rows; this gather was made for {self.batch_size}")
        self._check(idx)
        if self._device is None:
            B = self.batch_size
            shapes = ((B, *X.shape[1:]), X.dtype, (B, *Y.shape[1:]), Y.dtype)
            if self.buffers is not None:
                xb, yb = self.buffers(*shapes)
            else:
                xb, yb = xp.empty(shapes[0], dtype=X.dtype), xp.empty(shapes[2], dtype=Y.dtype)
            self._device = (xb, yb, xp.empty(B, dtype=np.int64))
        views = self._views.get(k)
        if views is None:  # the same view objects step after step (a step may key on them)
            views = self._views[k] = tuple(a[:k] for a in self._device)
        xb, yb, ib = views
        ib.set(np.ascontiguousarray(idx, dtype=np.int64))
        xp.take(X, ib, axis=0, out=xb)
        xp.take(Y, ib, axis=0, out=yb)
        return xb, yb

    def _check(self, idx: np.ndarray) -> None:
        """Raise unless ``idx`` holds integers in ``[0, N)``. A batch that is a view of an
        epoch's order (as :class:`EpochLoop` slices them) has the whole order checked once, the
        first time one of its batches comes (an order changed in place afterwards is not checked
        again): a check per step would add a quarter to the gather's cost."""
        base = idx.base if isinstance(idx.base, np.ndarray) else None
        whole = idx if base is None else base
        if whole is self._checked:
            return
        n = self.X.shape[0]
        if whole.dtype.kind not in "iu" or (
            whole.size and (int(whole.min()) < 0 or int(whole.max()) >= n)
        ):
            raise IndexError(
                f"batch indices must be integers in [0, {n}), the rows of X; got {whole.dtype} "
                f"values from {whole.min() if whole.size else '-'} to "
                f"{whole.max() if whole.size else '-'}"
            )
        if base is not None:
            self._checked = base  # kept alive here, so its identity cannot be reused


__all__ = ["BatchGather"]
