"""Sparse inputs in :class:`gpubp.MLP`: checked, preprocessed and trained on without densifying.

A scipy.sparse ``X`` ``(N, n_0)`` (CSR, CSC or COO, matrix or array) is checked once and kept
on the host as a canonical CSR array of the model's dtype. Each batch's rows are cut from it
and handed to the backend's first-layer products (:mod:`gpubp.backends.sparse`: scipy's on the
CPU, gpubp's CSR kernel on the GPU; the products the scikit-learn estimators use); every
other layer is the backend's dense ops. With ``W^1`` ``(n_1, n_0)`` and ``X`` ``(B, n_0)``:

    z^1   = X' @ W^1.T + b^1             dW^1 = delta^1.T @ X'            db^1 = sum_B delta^1

The model's preprocessing ``x' = (x - shift) * scale`` would fill every zero with
``-shift * scale``; instead ``X`` is stored scaled (``X_s = X diag(scale)``, the same
sparsity) and the shift is folded in exactly, with ``o = shift * scale`` ``(n_0,)``:

    z^1   = X_s @ W^1.T + (b^1 - W^1 @ o)
    dW^1  = delta^1.T @ X_s - db^1 o.T   (a rank-one correction; db^1 unchanged)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .backends import Backend, to_numpy
from .backends.sparse import is_sparse
from .gather import BatchGather

__all__ = [
    "SparseGather",
    "SparseRows",
    "check_sparse_x",
    "is_sparse",
    "sparse_gradients",
    "sparse_logits",
    "sparse_train_step",
]


def check_sparse_x(x: Any, argument: str, n_inputs: int, dtype: np.dtype[Any]) -> Any:
    """``x`` (any scipy.sparse matrix or array) checked as a batch ``(B, n_inputs)`` of finite
    real numbers: a canonical CSR array of ``dtype`` (duplicate entries summed), on the host.
    Raises :class:`TypeError` or :class:`ValueError` naming ``argument``."""
    import scipy.sparse as sp

    if x.ndim != 2 or x.shape[1] != n_inputs:
        raise ValueError(
            f"{argument} is a sparse matrix of shape {tuple(x.shape)}; expected (batch, "
            f"{n_inputs}), one column per input of the model"
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"{argument} is an empty batch (shape {tuple(x.shape)}); pass at least one row"
        )
    if np.dtype(x.dtype).kind not in "biuf":
        raise TypeError(
            f"{argument} is a sparse matrix of dtype {x.dtype}; expected real numbers (float or "
            f"int). Convert it with {argument}.astype(np.float32)"
        )
    with np.errstate(over="ignore"):
        csr = sp.csr_array(x, dtype=dtype, copy=True)
    csr.sum_duplicates()  # (duplicates of a COO input added, as its toarray() would)
    if not np.isfinite(csr.data).all():
        raise ValueError(
            f"{argument} contains NaN or infinity (or values beyond the range of {dtype.name}) "
            "among its stored values; clean or rescale the inputs first"
        )
    return csr


class SparseRows:
    """Preprocessed sparse inputs: ``x' = x_s - o`` row by row, ``x_s`` the sparse inputs
    times ``scale`` (a host CSR array ``(B, n_0)``), ``o = shift * scale`` a backend vector
    ``(n_0,)``, or None where the shift is zero (see the module doc)."""

    def __init__(self, x: Any, offset: Any = None) -> None:
        self.x = x
        self.offset = offset
        self.shape: tuple[int, int] = (int(x.shape[0]), int(x.shape[1]))

    def __getitem__(self, rows: Any) -> SparseRows:
        """The rows ``rows`` (a slice or host indices), a CSR array, the same offset."""
        return SparseRows(self.x[rows], self.offset)

    @classmethod
    def preprocessed(cls, x: Any, pre: Any, backend: Backend, dtype: np.dtype[Any]) -> SparseRows:
        """``x`` (a checked CSR array) under the :class:`~gpubp.preprocessing.Preprocessing`
        ``pre`` (None: as it is)."""
        if pre is None:
            return cls(x)
        scaled = x.copy()
        scale = np.asarray(pre.scale, dtype=dtype)
        scaled.data *= scale[scaled.indices]  # column j times scale_j: x_s = x diag(scale)
        offset = None
        if np.any(pre.shift != 0):
            offset = backend.asarray(np.asarray(pre.shift * pre.scale, dtype=dtype))
        return cls(scaled, offset)


def _first_bias(W1: Any, b1: Any, offset: Any) -> Any:
    """``b^1 - W^1 @ o`` ``(n_1,)``, or ``b^1`` itself without an offset."""
    return b1 if offset is None else b1 - W1 @ offset


def sparse_logits(
    be: Backend, weights: list[Any], biases: list[Any], x: SparseRows, activation: str
) -> Any:
    """The output pre-activation ``z^L`` ``(B, n_L)`` of sparse rows ``x`` (backend array)."""
    L = len(weights)
    dtype = weights[0].dtype
    b1 = _first_bias(weights[0], biases[0], x.offset)
    a = be.sparse_forward_layer(
        be.sparse_batch(x.x, dtype), weights[0].T, b1, activation if L > 1 else "identity"
    )
    for i in range(1, L):
        a = be.forward_layer(a, weights[i], biases[i], activation if i < L - 1 else "identity")
    return a


def sparse_gradients(
    be: Backend,
    weights: list[Any],
    biases: list[Any],
    x: SparseRows,
    y: Any,
    activation: str,
    output: str,
    loss: str,
) -> tuple[Any, list[Any], list[Any]]:
    """``(C, dWs, dbs)`` on sparse rows ``x`` ``(B, n_0)``: the backend's dense ops but for the
    first layer's two sparse-dense products (see the module doc); fresh arrays."""
    L = len(weights)
    dtype = weights[0].dtype
    xb = be.sparse_batch(x.x, dtype)
    b1 = _first_bias(weights[0], biases[0], x.offset)
    acts: list[Any] = [xb]
    z = be.sparse_forward_layer(xb, weights[0].T, b1, activation if L > 1 else "identity")
    for i in range(1, L):
        acts.append(z)
        z = be.forward_layer(z, weights[i], biases[i], activation if i < L - 1 else "identity")
    delta, value = be.output_delta(z, y, output, loss)
    dWs: list[Any] = [None] * L
    dbs: list[Any] = [None] * L
    for i in range(L - 1, 0, -1):
        dWs[i], dbs[i] = be.parameter_gradients(delta, acts[i])
        delta = be.hidden_delta(delta, weights[i], acts[i], activation)
    dW1 = be.xp.empty(weights[0].shape, dtype=dtype)
    be.sparse_weight_gradient(xb, delta, out=dW1.T)  # written in W^1's own layout
    dbs[0] = delta.sum(axis=0)
    if x.offset is not None:
        dW1 -= dbs[0][:, None] * x.offset[None, :]
    dWs[0] = dW1
    return value, dWs, dbs


def sparse_train_step(
    be: Backend,
    weights: list[Any],
    biases: list[Any],
    x: SparseRows,
    y: Any,
    model: Any,
    optimizer: Any,
    state: dict[str, Any],
) -> Any:
    """One step on sparse rows: :func:`sparse_gradients`, then the backend's checked update
    (:meth:`~gpubp.backends.base.Backend.apply_update`: nothing changes unless the loss and
    every new value are finite). ``model`` gives the activation, output and loss."""
    value, dWs, dbs = sparse_gradients(
        be, weights, biases, x, y, model.activation, model.output, model.loss
    )
    be.apply_update(value, [*weights, *biases], [*dWs, *dbs], optimizer, state)
    return value


class SparseGather:
    """:class:`gpubp.gather.BatchGather` for sparse inputs: ``(X[idx], Y[idx])`` with ``X`` a
    :class:`SparseRows` (its rows cut on the host) and ``Y`` on the backend."""

    def __init__(self, X: SparseRows, Y: Any, batch_size: int, xp: Any = None) -> None:
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X has {X.shape[0]} rows and Y {Y.shape[0]}; expected one target row per "
                "sample of X"
            )
        self.X, self.Y = X, Y

    def __call__(self, idx: Any) -> tuple[SparseRows, Any]:
        host = np.asarray(to_numpy(idx), dtype=np.int64)  # the host order's rows
        return self.X[host], self.Y[idx]


def batch_gather(
    X: Any, Y: Any, batch_size: int, backend: Backend
) -> Callable[[Any], tuple[Any, Any]]:
    """The gather of a fit's batches: :class:`SparseGather` for a :class:`SparseRows` ``X``, else
    :class:`gpubp.gather.BatchGather` into the backend's step input buffers (``min(batch_size,
    N)`` rows reused every step, on the device too)."""
    if isinstance(X, SparseRows):
        return SparseGather(X, Y, batch_size, xp=backend.xp)
    return BatchGather(X, Y, batch_size, xp=backend.xp, buffers=backend.batch_buffers)
