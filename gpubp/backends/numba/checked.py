"""The checked optimizer step of the Numba backend in one kernel call: proof, check, write.

One call per step decides and writes, over every tensor of the step (the tensors as tuples of
flat arrays, the rule's scalars as one float64 array, rounded to the tensors' dtype here):

1. the proof of :mod:`.optim_kernels` (:func:`sgd_proved`, :func:`adam_proved`), from
   ``G >= max |g|`` (given, or read here where ``G < 0``), ``max |p|`` (read here where the rule
   needs it) and the optimizer state's maxima that the previous write pass left in ``known``;
2. where it does not apply, the exact check pass (every new value computed, nothing written),
   which returns the index of the first tensor that would get a non-finite value: nothing has
   been written then;
3. the write pass, which takes the new state's maxima as it writes and leaves them in
   ``known``.

``known``: float64 ``(4,)``, ``(1, *maxima)`` where the maxima are known (SGD with momentum
``(max |buf|, 0, 0)``, Adam ``(max |m|, max v, min(0, min v))``; SGD without momentum has
no state and passes ``(1, 0, 0, 0)``), else ``known[0] = 0``: the exact check decides.
``limits``: float64 ``(3,)``, the dtype's ``(finite, change, tiny)`` (:func:`limits`).

Returns :data:`PROVED` or :data:`CHECKED` (written), or the index of the first tensor that
would get a non-finite value (nothing written).

The ``*_par`` kernels run each pass over ``plan``'s chunks (rows ``(tensor, lo, hi)``) on every
thread of the pool the GEMMs use (:mod:`.pool`), each chunk's result in its own row, combined
after the loop: the outcome does not depend on how the chunks were shared out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from . import (
    cache,  # noqa: F401 - before any kernel: the cache goes to the user's folder
    pool,  # noqa: F401 - before any parallel kernel: the OpenMP layer
)
from .optim_kernels import absmax, adam_apply, adam_check, sgd_apply, sgd_check

_jit = njit(cache=True, nogil=True, error_model="numpy")
_par = njit(cache=True, nogil=True, error_model="numpy", parallel=True)
_inline = njit(inline="always", error_model="numpy")

#: Status of a step that was written, decided by the proof.
PROVED = -1
#: Status of a step that was written, decided by the exact check pass.
CHECKED = -2


def limits(dtype: Any) -> np.ndarray:
    """``(finite, change, tiny)`` of ``dtype``: the bound on every magnitude that must only stay
    finite (``2^-8 F``, ``F`` the largest number: room for the rounding of every operation), on
    the change of a parameter (``2^-60 F``: far below half a unit in the last place of ``F``),
    and the smallest normal number (``eps'`` must be at least that)."""
    info = np.finfo(dtype)
    big = float(info.max)
    return np.array([big * 2.0**-8, big * 2.0**-60, float(info.tiny)])


# --- the proof ----------------------------------------------------------------------------------
# See the module docstring of .optim_kernels for the argument. A NaN anywhere makes a comparison
# false, so it is never proved.


@_jit
def sgd_proved(lr, mu, nesterov, wd, G, P, B, finite, change):  # type: ignore[no-untyped-def]
    """Whether the SGD step with these (dtype-rounded) scalars provably writes only finite
    values, given ``G >= max |g|``, ``P >= max |p|`` (0 where ``wd`` is 0) and
    ``B = max |buf|``."""
    lr, mu, wd = abs(lr), abs(mu), abs(wd)
    g2 = G + wd * P
    if mu == 0.0:
        ok, step = g2 <= finite, lr * g2
    else:
        buf = mu * B + g2
        inner = g2 + mu * buf if nesterov else buf
        ok, step = g2 <= finite and buf <= finite and inner <= finite, lr * inner
    return ok and lr <= finite and mu <= finite and wd <= finite and step <= change


@_jit
def adam_proved(b1, omb1, b2, omb2, eps, alpha, shrink, l2, G, P, M, V, vneg, lim):  # type: ignore[no-untyped-def]
    """Whether the Adam / AdamW step with these (dtype-rounded) scalars provably writes only
    finite values, given ``G``, ``P`` (0 where :func:`needs_p` is false), the state's
    ``(max |m|, max v, min(0, min v))`` and ``lim`` (:func:`limits`)."""
    finite, change, tiny = lim[0], lim[1], lim[2]
    if not (b2 >= 0.0 and omb2 >= 0.0 and vneg == 0.0 and eps >= tiny):
        return False
    g2 = G + abs(l2) * P
    m = abs(b1) * M + abs(omb1) * g2
    v = b2 * V + omb2 * (g2 * g2)
    shrunk = abs(shrink) * P if abs(shrink) > 1.0 else 0.0
    sizes = np.array([b1, omb1, b2, omb2, alpha, l2, g2, g2 * g2, m, v, m / eps, shrunk])
    ok = True
    for x in sizes:
        ok = ok and abs(x) <= finite
    return ok and abs(alpha) * (m / eps) <= change


@_inline
def needs_p(kind_adam, s):  # type: ignore[no-untyped-def]
    """Whether the proof needs ``max |p|``: only where the rule adds a multiple of ``p`` to the
    gradient (weight decay as L2) or scales ``p`` by more than 1 (an AdamW ``shrink``)."""
    if kind_adam:
        return s[7] != 0.0 or not abs(s[6]) <= 1.0
    return s[3] != 0.0


@_inline
def _biggest(xs):  # type: ignore[no-untyped-def]
    top = 0.0
    for k in range(len(xs)):
        top = max(top, float(absmax(xs[k], 0, xs[k].shape[0])))
    return top


@_inline
def _bounds(ps, gs, G, read_p):  # type: ignore[no-untyped-def]
    """``(G, P)`` for the proof, on one thread: ``G`` as given where it is (``>= 0``), else
    ``max |g|`` read; ``max |p|`` where ``read_p``, else 0 (:func:`_bounds_par` on every
    thread)."""
    return (_biggest(gs) if G < 0.0 else G), (_biggest(ps) if read_p else 0.0)


# --- one thread ---------------------------------------------------------------------------------


@_jit
def sgd_step(ps, gs, bufs, wide, G, known, lim):  # type: ignore[no-untyped-def]
    """The checked SGD step (``wide``: ``(lr, momentum, nesterov, weight_decay)``); see the
    module docstring. ``bufs`` is ``ps`` without momentum."""
    s = np.empty(4, ps[0].dtype)
    s[:] = wide
    lr, mu, wd = s[0], s[1], s[3]
    nesterov = wide[2] != 0
    proved = False
    if known[0] != 0.0:
        G, P = _bounds(ps, gs, G, needs_p(False, s))
        proved = sgd_proved(
            float(lr), float(mu), nesterov, float(wd), G, P, known[1], lim[0], lim[1]
        )
    if not proved:
        for k in range(len(ps)):
            if sgd_check(ps[k], gs[k], bufs[k], 0, ps[k].shape[0], lr, mu, nesterov, wd):
                return k
    top = 0.0
    for k in range(len(ps)):
        top = max(
            top, float(sgd_apply(ps[k], gs[k], bufs[k], 0, ps[k].shape[0], lr, mu, nesterov, wd))
        )
    known[0], known[1], known[2], known[3] = 1.0, top, 0.0, 0.0
    return PROVED if proved else CHECKED


@_inline
def _eight(s):  # type: ignore[no-untyped-def]
    return s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]


@_inline
def _adam_proof(s, G, P, known, lim):  # type: ignore[no-untyped-def]
    b1, omb1, b2, omb2, eps, alpha, shrink, l2 = _eight(s)
    return adam_proved(
        float(b1),
        float(omb1),
        float(b2),
        float(omb2),
        float(eps),
        float(alpha),
        float(shrink),
        float(l2),
        G,
        P,
        known[1],
        known[2],
        known[3],
        lim,
    )


@_jit
def adam_step(ps, gs, ms, vs, wide, G, known, lim):  # type: ignore[no-untyped-def]
    """The checked Adam / AdamW step (``wide``: :class:`gpubp.optim.AdamScalars`); see the
    module docstring."""
    s = np.empty(8, ps[0].dtype)
    s[:] = wide
    proved = False
    if known[0] != 0.0:
        G, P = _bounds(ps, gs, G, needs_p(True, s))
        proved = _adam_proof(s, G, P, known, lim)
    if not proved:
        for k in range(len(ps)):
            if adam_check(ps[k], gs[k], ms[k], vs[k], 0, ps[k].shape[0], *_eight(s)):
                return k
    M, V, N = 0.0, 0.0, 0.0
    for k in range(len(ps)):
        m, v, n = adam_apply(ps[k], gs[k], ms[k], vs[k], 0, ps[k].shape[0], *_eight(s))
        M, V, N = max(M, float(m)), max(V, float(v)), min(N, float(n))
    known[0], known[1], known[2], known[3] = 1.0, M, V, N
    return PROVED if proved else CHECKED


# --- every thread -------------------------------------------------------------------------------


@_inline
def _bounds_par(ps, gs, plan, G, read_p):  # type: ignore[no-untyped-def]
    """``(G, P)`` for the proof: ``G`` as given where it is (``>= 0``), else ``max |g|`` read;
    ``max |p|`` where ``read_p``, else 0; the reads over ``plan``'s chunks in parallel."""
    read_g = G < 0.0
    if not (read_g or read_p):
        return G, 0.0
    rows = np.zeros((plan.shape[0], 2))
    for c in prange(plan.shape[0]):
        k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        if read_g:
            rows[c, 0] = float(absmax(gs[k], lo, hi))
        if read_p:
            rows[c, 1] = float(absmax(ps[k], lo, hi))
    return (rows[:, 0].max() if read_g else G), (rows[:, 1].max() if read_p else 0.0)


@_inline
def _first_bad(plan, flags):  # type: ignore[no-untyped-def]
    """The lowest tensor index among ``plan``'s rows flagged non-zero in ``flags``, -1 where
    none is: the tensor the serial kernels name (the rows go share by share, not in tensor
    order, so the first flagged row may be a later tensor's)."""
    bad = -1
    for c in range(plan.shape[0]):
        if flags[c] != 0.0 and (bad < 0 or plan[c, 0] < bad):
            bad = plan[c, 0]
    return bad


@_par
def sgd_step_par(ps, gs, bufs, wide, G, known, lim, plan):  # type: ignore[no-untyped-def]
    """:func:`sgd_step` over ``plan``'s chunks in parallel."""
    s = np.empty(4, ps[0].dtype)
    s[:] = wide
    lr, mu, wd = s[0], s[1], s[3]
    nesterov = wide[2] != 0
    n = plan.shape[0]
    proved = False
    if known[0] != 0.0:
        G, P = _bounds_par(ps, gs, plan, G, needs_p(False, s))
        proved = sgd_proved(
            float(lr), float(mu), nesterov, float(wd), G, P, known[1], lim[0], lim[1]
        )
    out = np.zeros(n)
    if not proved:
        for c in prange(n):
            k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
            out[c] = 1.0 if sgd_check(ps[k], gs[k], bufs[k], lo, hi, lr, mu, nesterov, wd) else 0.0
        bad = _first_bad(plan, out)
        if bad >= 0:
            return bad
    for c in prange(n):
        k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        out[c] = float(sgd_apply(ps[k], gs[k], bufs[k], lo, hi, lr, mu, nesterov, wd))
    known[0], known[1], known[2], known[3] = 1.0, out.max(), 0.0, 0.0
    return PROVED if proved else CHECKED


@_par
def adam_step_par(ps, gs, ms, vs, wide, G, known, lim, plan):  # type: ignore[no-untyped-def]
    """:func:`adam_step` over ``plan``'s chunks in parallel."""
    s = np.empty(8, ps[0].dtype)
    s[:] = wide
    n = plan.shape[0]
    proved = False
    if known[0] != 0.0:
        G, P = _bounds_par(ps, gs, plan, G, needs_p(True, s))
        proved = _adam_proof(s, G, P, known, lim)
    rows = np.zeros((n, 3))
    if not proved:
        for c in prange(n):
            k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
            bad = adam_check(ps[k], gs[k], ms[k], vs[k], lo, hi, *_eight(s))
            rows[c, 0] = 1.0 if bad else 0.0
        bad = _first_bad(plan, rows[:, 0])
        if bad >= 0:
            return bad
    for c in prange(n):
        k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        m, v, w = adam_apply(ps[k], gs[k], ms[k], vs[k], lo, hi, *_eight(s))
        rows[c, 0], rows[c, 1], rows[c, 2] = float(m), float(v), float(w)
    known[0], known[3] = 1.0, rows[:, 2].min()
    known[1], known[2] = rows[:, 0].max(), rows[:, 1].max()
    return PROVED if proved else CHECKED


def chunk_plan(sizes: list[int], chunk: int, parts: int = 1) -> np.ndarray:
    """``(tensor, lo, hi)`` rows cutting tensors of ``sizes`` into chunks of at most ``chunk``
    elements, whose ends are multiples of 64 but at a tensor's end.

    Each tensor is cut into ``parts`` shares as equal as 64 allows, and the rows go share by
    share: share 0 of every tensor, in order, then share 1, and so on, each share's rows
    padded to one count with empty rows (``lo == hi``). A parallel loop's static schedule
    gives each of ``parts`` threads one contiguous block of as many rows, so thread ``t``
    updates share ``t`` of every tensor: the same elements at every step, each tensor's work
    split evenly, and share ``t`` of ``dW`` where the GEMM's thread ``t`` most likely left it
    (docs/DESIGN.md, section 7, gives what it was measured to save).
    """
    shares: list[list[tuple[int, int, int]]] = [[] for _ in range(max(1, parts))]
    for k, n in enumerate(sizes):
        cuts = [min(n, (n * t // len(shares) + 32) // 64 * 64) for t in range(len(shares))] + [n]
        for t, rows in enumerate(shares):
            rows.extend(
                (k, lo, min(lo + chunk, cuts[t + 1])) for lo in range(cuts[t], cuts[t + 1], chunk)
            )
    most = max(len(rows) for rows in shares)
    flat = [row for rows in shares for row in rows + [(0, 0, 0)] * (most - len(rows))]
    return np.array(flat, dtype=np.int64).reshape(-1, 3)


__all__ = [
    "CHECKED",
    "PROVED",
    "adam_step",
    "adam_step_par",
    "chunk_plan",
    "limits",
    "sgd_step",
    "sgd_step_par",
]
