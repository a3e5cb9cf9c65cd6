"""One optimizer rule over many tensors in one kernel call, each with its own weight decay:
the unchecked in-place ops :meth:`~gpubp.backends.update.UpdateOps.sgd_update_many` and
:meth:`~gpubp.backends.update.UpdateOps.adam_update_many` of the Numba backend (the step of
scikit-learn's solvers, whose L2 penalty spares the biases).

The tensors come as tuples of flat arrays of one dtype and ``scal`` as a ``(tensors, k)`` array
of that dtype, row ``t`` the scalars of :func:`.optim_kernels.sgd_apply` (``lr, mu, wd``) or
:func:`.optim_kernels.adam_apply` (its eight) for tensor ``t``. The ``*_par`` kernels share
``plan``'s chunks (rows ``(tensor, lo, hi)``, :func:`.checked.chunk_plan`) out over the threads
of the pool the GEMMs use; every element is computed as the one-tensor op computes it.
"""

from __future__ import annotations

from numba import njit, prange

from . import (
    cache,  # noqa: F401 - before any kernel: the cache goes to the user's folder
    pool,  # noqa: F401 - before any parallel kernel: the OpenMP layer
)
from .optim_kernels import adam_apply, sgd_apply

_jit = njit(cache=True, nogil=True, error_model="numpy")
_par = njit(cache=True, nogil=True, error_model="numpy", parallel=True)


@_jit
def sgd_many(ps, gs, bufs, scal, nesterov):  # type: ignore[no-untyped-def]
    """The SGD step on every tensor, one after another (``bufs[t]`` is ``ps[t]`` where the
    rule has no momentum)."""
    for t in range(len(ps)):
        s = scal[t]
        sgd_apply(ps[t], gs[t], bufs[t], 0, ps[t].shape[0], s[0], s[1], nesterov, s[2])


@_par
def sgd_many_par(ps, gs, bufs, scal, nesterov, plan):  # type: ignore[no-untyped-def]
    """:func:`sgd_many` over ``plan``'s chunks in parallel."""
    for c in prange(plan.shape[0]):
        t, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        s = scal[t]
        sgd_apply(ps[t], gs[t], bufs[t], lo, hi, s[0], s[1], nesterov, s[2])


@_jit
def adam_many(ps, gs, ms, vs, scal):  # type: ignore[no-untyped-def]
    """The Adam / AdamW step on every tensor, one after another."""
    for t in range(len(ps)):
        s = scal[t]
        adam_apply(
            ps[t], gs[t], ms[t], vs[t], 0, ps[t].shape[0],
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
        )  # fmt: skip


@_par
def adam_many_par(ps, gs, ms, vs, scal, plan):  # type: ignore[no-untyped-def]
    """:func:`adam_many` over ``plan``'s chunks in parallel."""
    for c in prange(plan.shape[0]):
        t, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        s = scal[t]
        adam_apply(
            ps[t], gs[t], ms[t], vs[t], lo, hi, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
        )


__all__ = ["adam_many", "adam_many_par", "sgd_many", "sgd_many_par"]
