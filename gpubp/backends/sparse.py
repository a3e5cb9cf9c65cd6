"""The first layer on sparse input: the two sparse-dense products, written against scipy.

With a sparse input batch ``X`` ``(B, n_0)`` (CSR rows of the user's matrix, never densified)
only the first layer changes; every other layer is the backend's dense ops:

    z^1    = X @ W^1.T + b^1                  (B, n_0) @ (n_0, n_1) + (n_1,)   -> (B, n_1)
    dW^1.T = X.T @ delta^1                    (n_0, B) @ (B, n_1)              -> (n_0, n_1)
    db^1   = sum over the batch of delta^1    (unchanged: ``delta^1`` is dense)

The products take ``W^1.T`` and give ``dW^1.T``, ``(n_0, n_1)``: that is the layout in which a
CSR product reads the weights row by row and writes the gradient without a transpose
(scikit-learn's ``coefs_[0]``), so a caller that keeps ``W^1`` stored as ``(n_0, n_1)`` passes
it as it is; one that keeps gpubp's ``(n_1, n_0)`` passes the transposed view (on the CPU scipy
then reads a contiguous copy of it; the GPU kernel reads it in place through its strides).

:class:`SparseOps` (a mixin of :class:`~gpubp.backends.base.Backend`) computes them with scipy's
products (the CPU backends); the CuPy backend overrides them with gpubp's own kernels
(:mod:`gpubp.backends.cuda.sparse`). scipy is imported only when a sparse batch is made: a
dense user never needs it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .. import activations as act


def is_sparse(x: Any) -> bool:
    """Whether ``x`` is a scipy.sparse matrix or array (False, without importing scipy, when
    scipy.sparse was never imported: then no such object can exist)."""
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and bool(sparse.issparse(x))


class CsrBatch:
    """Rows of a sparse input, as the first layer's products read them.

    Attributes
    ----------
    x : scipy.sparse.csr_array
        ``(B, n_0)``, canonical (sorted column indices, no duplicates), in the model's dtype.
    shape : tuple of int
        ``(B, n_0)``.
    device : object or None
        What a GPU backend uploaded for its kernels (:mod:`gpubp.backends.cuda.sparse`); None
        on the CPU.
    """

    def __init__(self, x: Any, dtype: Any) -> None:
        import scipy.sparse as sp

        csr = sp.csr_array(x, dtype=dtype)
        if not csr.has_canonical_format:  # sums duplicate entries, sorts each row's columns
            csr = csr.copy()
            csr.sum_duplicates()
        self.x = csr
        self.shape: tuple[int, int] = (int(csr.shape[0]), int(csr.shape[1]))
        self.device: Any = None

    @property
    def dtype(self) -> np.dtype[Any]:
        return np.dtype(self.x.dtype)

    def transposed(self) -> Any:
        """``X.T`` ``(n_0, B)`` as a canonical CSR array (on the host: scipy's transpose)."""
        import scipy.sparse as sp

        t = sp.csr_array(self.x.T)
        t.sort_indices()  # (scipy's transpose already gives each row's columns in order)
        return t


class SparseOps:
    """The first layer's products on a :class:`CsrBatch`; a mixin of
    :class:`~gpubp.backends.base.Backend` (which provides ``xp``)."""

    xp: Any

    def sparse_batch(self, x: Any, dtype: Any) -> CsrBatch:
        """``x`` (any scipy.sparse rows ``(B, n_0)``) as this backend's :class:`CsrBatch` of
        ``dtype``."""
        return CsrBatch(x, dtype)

    def sparse_forward_layer(
        self, x: CsrBatch, Wt: Any, b: Any, activation: str, *, out: Any = None
    ) -> Any:
        """``a = f(X @ Wt + b)``: ``(B, n_0) @ (n_0, n_1) + (n_1,) -> (B, n_1)``.

        ``Wt`` is ``W^1.T`` (any strides); bias and activation in place on the product.
        """
        if self.xp is not np:
            raise NotImplementedError(f"{type(self).__name__} has no sparse first layer")
        z = np.asarray(x.x @ Wt)
        if out is not None:
            out[...] = z
            z = out
        z += b
        return act.apply_inplace(np, z, activation)

    def sparse_weight_gradient(self, x: CsrBatch, delta: Any, *, out: Any = None) -> Any:
        """``dW^1.T = X.T @ delta``: ``(n_0, B) @ (B, n_1) -> (n_0, n_1)`` (into ``out``, of
        that shape and any strides, when given)."""
        if self.xp is not np:
            raise NotImplementedError(f"{type(self).__name__} has no sparse first layer")
        g = np.asarray(x.x.T @ delta)
        if out is None:
            return g
        out[...] = g
        return out
