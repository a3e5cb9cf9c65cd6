"""The Numba backend's optimizer kernels and the proof that a step is finite.

A step must change nothing when any new parameter or optimizer state would be NaN or infinite.
The update runs over flat 1-D views of the tensors, per range ``[lo, hi)`` (so that the backend
can split a tensor over its threads; the kernels release the GIL):

- ``*_apply``: computes the new values and writes them, and returns the new state's maxima
  (``max |buf'|``; ``max |m'|``, ``max v'``, ``min(0, min v')``), taken in the same loop;
- ``*_check``: computes the same values (same expressions, same order) without writing and
  returns whether any of them is not finite: the exact check, a second full pass;
- :func:`absmax`: ``max |x|`` (inf for NaN or infinity), one read pass.

Before writing, the backend first tries :func:`provably_finite`: from ``G = max |g|`` (one read
of the gradients; a NaN or infinite gradient makes it inf, which fails the proof), the state's
maxima returned by the previous write pass, and ``P = max |p|`` only where the rule needs it.
If the proof fails (or the maxima are unknown), the exact check pass decides: every check
before the first write, so a rejected step leaves every tensor as it was.

The argument, with ``F`` the dtype's largest number, ``u`` its unit roundoff, every scalar as
rounded to the dtype, and the bounds computed in float64 from ``G``, ``P`` and the maxima:

- Inputs. Parameters are finite (an invariant: they are written only by checked steps and by
  ``set_parameters``, which rejects non-finite values); the state is finite because its maxima
  are (NaN never passes a comparison).
- Every magnitude that only has to stay finite is bounded by the triangle inequality, term by
  term (SGD: ``|g'| <= G + wd P``, ``|buf'| <= mu B + |g'|``, the Nesterov sum
  ``|g' + mu buf'|``; Adam: ``|g'| <= G + |l2| P``, ``|m'| <= |b1| M + (1 - b1) |g'|``,
  ``0 <= v' <= b2 V + (1 - b2) |g'|^2`` given ``v >= 0`` and ``b2, 1 - b2 >= 0``,
  ``|g'|^2``, and the quotient ``|m'| / (sqrt(v') + eps') <= |m'| / eps'``, whose
  denominator is at least ``eps'`` (rounding is monotone), required to be a normal number).
  Each bound must be at most ``2^-8 F``: every rounded result is within a factor
  ``(1 + u)^k`` (a few operations) of the exact one, and an underflow adds at most the
  smallest normal number, so no intermediate or new value can reach ``F``. No NaN can arise:
  that needs an infinity, ``0/0`` or the root of a negative number, all excluded.
- The change of a parameter, ``|D| = lr |g'|``, ``lr |buf'|``, ``lr |g' + mu buf'|`` or
  ``alpha |m'| / eps'`` (Adam), must be at most ``2^-60 F``. The new parameter
  ``fl(p s - fl(D))`` with ``s = 1`` (or AdamW's ``|shrink| <= 1``, so ``|p s| <= |p| <= F``)
  is then finite: the exact difference is below ``F`` plus half a unit in the last place of
  ``F`` (about ``2^-25 F`` in float32), the threshold where round-to-nearest overflows. (An AdamW
  ``|shrink| > 1`` reads ``P`` and bounds ``|p shrink|`` with the finite ones.)
- The maxima of the new state come from the write pass itself and are kept in the state dict
  (:data:`gpubp.backends.update.MAXIMA`); every other path that writes the optimizer state
  (the unchecked ``update_parameters``, the staged check) drops them, and a new state
  (``bind``, ``load_state_dict``) has none, so the next step takes the exact check. Assumed:
  nothing else writes the optimizer's state arrays or the model's parameter arrays in place
  with larger or non-finite values between steps (the per-parameter ops called directly on
  the optimizer's own state included; zeroing the state, as a benchmark reset does, is safe:
  the recorded maxima then over-estimate).

Arithmetic is in the parameters' dtype: the scalars arrive already rounded to it (float32
scalars for float32 tensors), so no element is promoted to float64 and the loops vectorise.
The finiteness test is ``d = x - x; d != d`` (``x - x`` is NaN exactly for NaN and infinity),
or-ed into a bool, so the check loop vectorises too (an int64 count measured 1.5x slower).
Maxima inside a loop are kept in :data:`LANES` accumulators (one running maximum does not
vectorise). No ``fastmath``: it would let LLVM assume there is no NaN or infinity and drop the
very test.

Rules (``torch.optim``'s; ``t`` the step, ``g`` the gradient):

- SGD: ``g' = g + wd p``; momentum ``buf = mu buf + g'``; ``p -= lr (g' + mu buf)``
  (Nesterov) or ``p -= lr buf``; without momentum ``p -= lr g'``.
- Adam / AdamW: ``g' = g + l2 p``; ``m = b1 m + (1 - b1) g'``; ``v = b2 v + (1 - b2) g'^2``;
  ``p = p shrink - m / (sqrt(v) + eps') alpha`` with ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``
  and ``eps' = eps sqrt(1 - b2^t)`` (the bias corrections folded into two scalars, as in the
  NumPy backend: ``lr / (1 - b1^t)`` alone can overflow where the step does not), and
  ``l2 = wd, shrink = 1`` (Adam) or ``l2 = 0, shrink = 1 - lr wd`` (AdamW).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ...optim import adam_scalars as rule_scalars
from . import (
    cache,  # noqa: F401 - before any kernel: the cache goes to the user's folder
    pool,  # noqa: F401 - before any parallel kernel: the OpenMP layer
)

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", error_model="numpy")

#: Accumulators of a maximum taken inside a loop (a multiple of the widest SIMD register).
LANES = 32


@_jit
def sgd_check(p, g, buf, lo, hi, lr, mu, nesterov, wd):  # type: ignore[no-untyped-def]
    """Whether any of elements ``[lo, hi)`` would get a non-finite ``p`` or ``buf`` (nothing
    written). ``p``, ``g``, ``buf``: flat arrays of one dtype (``buf`` unused when ``mu`` is 0);
    the scalars are of that dtype."""
    p, g, buf = p[lo:hi], g[lo:hi], buf[lo:hi]
    bad = False
    if mu == 0:
        if wd == 0:
            for k in range(p.shape[0]):
                q = p[k] - lr * g[k]
                d = q - q
                bad |= d != d
        else:
            for k in range(p.shape[0]):
                q = p[k] - lr * (g[k] + wd * p[k])
                d = q - q
                bad |= d != d
    elif nesterov:
        for k in range(p.shape[0]):
            gk = g[k] + wd * p[k]
            m = mu * buf[k] + gk
            q = p[k] - lr * (gk + mu * m)
            d = (q - q) + (m - m)
            bad |= d != d
    else:
        for k in range(p.shape[0]):
            m = mu * buf[k] + (g[k] + wd * p[k])
            q = p[k] - lr * m
            d = (q - q) + (m - m)
            bad |= d != d
    return bad


@_jit
def sgd_apply(p, g, buf, lo, hi, lr, mu, nesterov, wd):  # type: ignore[no-untyped-def]
    """Write the SGD step of :func:`sgd_check` into elements ``[lo, hi)`` of ``p`` (and
    ``buf``); returns ``max |buf'|`` over the range (0 without momentum)."""
    p, g, buf = p[lo:hi], g[lo:hi], buf[lo:hi]
    n = p.shape[0]
    if mu == 0:
        if wd == 0:
            for k in range(n):
                p[k] = p[k] - lr * g[k]
        else:
            for k in range(n):
                p[k] = p[k] - lr * (g[k] + wd * p[k])
        return lr - lr
    # the maximum kept in LANES accumulators, so that the loop vectorises (see absmax)
    acc = np.zeros(LANES, p.dtype)
    whole = n - n % LANES
    for s in range(0, whole, LANES):
        for j in range(LANES):
            acc[j] = max(acc[j], _sgd_one(p, g, buf, s + j, lr, mu, nesterov, wd))
    for k in range(whole, n):
        acc[0] = max(acc[0], _sgd_one(p, g, buf, k, lr, mu, nesterov, wd))
    return acc.max()


@_inline
def _sgd_one(p, g, buf, k, lr, mu, nesterov, wd):  # type: ignore[no-untyped-def]
    """The momentum step of element ``k``, written; returns ``|buf'|``."""
    gk = g[k] + wd * p[k]
    m = mu * buf[k] + gk
    buf[k] = m
    if nesterov:
        p[k] = p[k] - lr * (gk + mu * m)
    else:
        p[k] = p[k] - lr * m
    return abs(m)


@_jit
def adam_check(  # type: ignore[no-untyped-def]
    p, g, m, v, lo, hi, b1, omb1, b2, omb2, eps, alpha, shrink, l2
):
    """Whether any of elements ``[lo, hi)`` would get a non-finite ``p``, ``m`` or ``v`` (nothing
    written); the scalars are of the arrays' dtype (see the module docstring)."""
    p, g, m, v = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    bad = False
    for k in range(p.shape[0]):
        pk = p[k]
        gk = g[k] + l2 * pk
        mk = b1 * m[k] + omb1 * gk
        vk = b2 * v[k] + omb2 * (gk * gk)
        q = pk * shrink - mk / (math.sqrt(vk) + eps) * alpha
        d = (q - q) + (mk - mk) + (vk - vk)
        bad |= d != d
    return bad


@_jit
def adam_apply(  # type: ignore[no-untyped-def]
    p, g, m, v, lo, hi, b1, omb1, b2, omb2, eps, alpha, shrink, l2
):
    """Write the Adam / AdamW step of :func:`adam_check` into elements ``[lo, hi)``; returns
    ``(max |m'|, max v', min(0, min v'))`` over the range."""
    p, g, m, v = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    n = p.shape[0]
    am = np.zeros(LANES, p.dtype)
    av = np.zeros(LANES, p.dtype)
    an = np.zeros(LANES, p.dtype)
    whole = n - n % LANES
    for s in range(0, whole, LANES):
        for j in range(LANES):
            mk, vk = _adam_one(p, g, m, v, s + j, b1, omb1, b2, omb2, eps, alpha, shrink, l2)
            am[j] = max(am[j], abs(mk))
            av[j] = max(av[j], vk)
            an[j] = min(an[j], vk)
    for k in range(whole, n):
        mk, vk = _adam_one(p, g, m, v, k, b1, omb1, b2, omb2, eps, alpha, shrink, l2)
        am[0] = max(am[0], abs(mk))
        av[0] = max(av[0], vk)
        an[0] = min(an[0], vk)
    return am.max(), av.max(), an.min()


@_inline
def _adam_one(p, g, m, v, k, b1, omb1, b2, omb2, eps, alpha, shrink, l2):  # type: ignore[no-untyped-def]
    """The Adam step of element ``k``, written; returns ``(m', v')``."""
    pk = p[k]
    gk = g[k] + l2 * pk
    mk = b1 * m[k] + omb1 * gk
    vk = b2 * v[k] + omb2 * (gk * gk)
    m[k] = mk
    v[k] = vk
    p[k] = pk * shrink - mk / (math.sqrt(vk) + eps) * alpha
    return mk, vk


@_jit
def absmax(x, lo, hi):  # type: ignore[no-untyped-def]
    """``max |x|`` over elements ``[lo, hi)`` of flat ``x`` (as a float); inf if any of them is
    NaN or infinite. Kept in LANES accumulators: a single running maximum does not vectorise
    (measured 7x slower)."""
    x = x[lo:hi]
    n = x.shape[0]
    acc = np.zeros(LANES, x.dtype)
    bad = np.zeros(LANES, x.dtype)
    whole = n - n % LANES
    for s in range(0, whole, LANES):
        for j in range(LANES):
            a = abs(x[s + j])
            acc[j] = max(acc[j], a)
            bad[j] += a - a  # NaN exactly where x is NaN or infinite
    for k in range(whole, n):
        a = abs(x[k])
        acc[0] = max(acc[0], a)
        bad[0] += a - a
    for j in range(LANES):
        if bad[j] != 0:
            return np.inf
    return float(acc.max())


def sgd_scalars(
    dtype: Any, lr: float, momentum: float, nesterov: bool, weight_decay: float
) -> tuple[Any, ...]:
    """The scalars of :func:`sgd_check` / :func:`sgd_apply`, rounded to ``dtype``."""
    t = np.dtype(dtype).type
    with np.errstate(over="ignore"):  # an lr beyond the dtype becomes inf: a rejected step
        return (t(lr), t(momentum), bool(nesterov), t(weight_decay))


def adam_scalars(
    dtype: Any,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> tuple[Any, ...]:
    """The scalars of :func:`adam_check` / :func:`adam_apply`: :func:`gpubp.optim.adam_scalars`,
    each rounded once to ``dtype``."""
    t = np.dtype(dtype).type
    values = rule_scalars(step, lr, beta1, beta2, eps, weight_decay, decoupled)
    with np.errstate(over="ignore"):
        return tuple(t(x) for x in values)


def scalars(kind: str, dtype: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The kernels' scalars for ``kind`` ("sgd" or "adam") from the optimizer's
    ``op_arguments(step)``."""
    return sgd_scalars(dtype, *args) if kind == "sgd" else adam_scalars(dtype, *args)


def _limits(dtype: Any) -> tuple[float, float]:
    """``(finite, change)``: the bound on every magnitude that must only stay finite (``2^-8``
    of the dtype's largest number ``F``: room for the rounding of every operation), and the
    bound on the change of a parameter (``2^-60 F``, float32 about 3e20: far below half a unit
    in the last place of ``F``, float32 ``2^103``, about 1e31; float64 ``2^970``)."""
    big = float(np.finfo(dtype).max)
    return big * 2.0**-8, big * 2.0**-60


def needs_parameter_bound(kind: str, scalars: tuple[Any, ...]) -> bool:
    """Whether the proof of :func:`provably_finite` needs ``max |p|``: only when the rule adds a
    multiple of ``p`` to the gradient (weight decay as L2) or scales ``p`` by more than 1."""
    if kind == "sgd":
        return float(scalars[3]) != 0.0
    return float(scalars[7]) != 0.0 or not abs(float(scalars[6])) <= 1.0


def provably_finite(
    kind: str, scalars: tuple[Any, ...], dtype: Any, G: float, P: float, state: tuple[float, ...]
) -> bool:
    """Whether the step of :func:`sgd_apply` (``kind`` "sgd") or :func:`adam_apply` ("adam")
    with these (dtype-rounded) ``scalars`` provably writes only finite values, given finite
    parameters and ``G >= max |g|``, ``P >= max |p|`` (0 when
    :func:`needs_parameter_bound` is false) and the state's maxima (SGD with momentum:
    ``(max |buf|,)``; Adam: ``(max |m|, max v, min(0, min v))``). See the module docstring for
    the argument. A NaN anywhere makes a comparison false, so it is never proved.
    """
    finite, change = _limits(dtype)
    if kind == "sgd":
        lr, mu, wd = (abs(float(scalars[i])) for i in (0, 1, 3))
        g2 = G + wd * P
        if mu == 0.0:
            sizes, step = [g2], lr * g2
        else:
            buf = mu * state[0] + g2
            inner = g2 + mu * buf if scalars[2] else buf
            sizes, step = [g2, buf, inner], lr * inner
        return all(x <= finite for x in (lr, mu, wd, *sizes)) and step <= change
    b1, omb1, b2, omb2, eps, alpha, shrink, l2 = (float(x) for x in scalars)
    M, V, vneg = state
    if not (b2 >= 0.0 and omb2 >= 0.0 and vneg == 0.0 and eps >= float(np.finfo(dtype).tiny)):
        return False
    g2 = G + abs(l2) * P
    m = abs(b1) * M + abs(omb1) * g2
    v = b2 * V + omb2 * (g2 * g2)
    shrunk = abs(shrink) * P if abs(shrink) > 1.0 else 0.0
    sizes = [b1, omb1, b2, omb2, alpha, l2, g2, g2 * g2, m, v, m / eps, shrunk]
    return all(abs(x) <= finite for x in sizes) and abs(alpha) * (m / eps) <= change


# --- every tensor in one call -------------------------------------------------------------------
# For a step whose update runs on one thread: the tensors as tuples of flat arrays, the scalars
# as one float64 array (rounded to the tensors' dtype here, once each, as the *_scalars do).


@_jit
def sgd_all(ps, gs, bufs, scalars, write):  # type: ignore[no-untyped-def]
    """:func:`sgd_check` (``write`` false: the index of the first tensor that would get a
    non-finite value, or -1) or :func:`sgd_apply` (``write`` true: ``max |buf'|``) over every
    tensor; ``scalars``: float64 ``(lr, momentum, nesterov, weight_decay)``."""
    s = np.empty(4, ps[0].dtype)
    s[:] = scalars
    lr, mu, wd = s[0], s[1], s[3]
    nesterov = scalars[2] != 0
    top = 0.0
    for k in range(len(ps)):
        n = ps[k].shape[0]
        if write:
            top = max(top, float(sgd_apply(ps[k], gs[k], bufs[k], 0, n, lr, mu, nesterov, wd)))
        elif sgd_check(ps[k], gs[k], bufs[k], 0, n, lr, mu, nesterov, wd):
            return float(k)
    return top if write else -1.0


@_jit
def adam_all(ps, gs, ms, vs, scalars, write):  # type: ignore[no-untyped-def]
    """:func:`adam_check` (``write`` false: the index of the first tensor that would get a
    non-finite value, or -1, in ``out[0]``) or :func:`adam_apply` (``write`` true: the state's
    maxima) over every tensor; ``scalars``: float64, as :func:`adam_scalars` orders them."""
    s = np.empty(8, ps[0].dtype)
    s[:] = scalars
    out = np.zeros(3)
    out[0] = -1.0
    for k in range(len(ps)):
        n = ps[k].shape[0]
        if write:
            M, V, N = adam_apply(ps[k], gs[k], ms[k], vs[k], 0, n, *_eight(s))
            out[0] = max(out[0], float(M)) if k else float(M)
            out[1] = max(out[1], float(V)) if k else float(V)
            out[2] = min(out[2], float(N)) if k else float(N)
        elif adam_check(ps[k], gs[k], ms[k], vs[k], 0, n, *_eight(s)):
            out[0] = k
            return out
    return out


@_inline
def _eight(s):  # type: ignore[no-untyped-def]
    return s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]


# --- every tensor in one call, on every thread --------------------------------------------------
# The same passes over ``plan``'s chunks (rows ``(tensor, lo, hi)``), one chunk per iteration of
# a parallel loop: on the OpenMP pool the GEMMs use (:mod:`.pool`). Each chunk runs the serial
# kernel above on its range and leaves its result in a row of ``out``; the rows are combined
# after the loop, so the outcome does not depend on how the chunks were shared out.

_par = njit(cache=True, nogil=True, error_model="numpy", parallel=True)


@_par
def sgd_all_par(ps, gs, bufs, scalars, write, plan):  # type: ignore[no-untyped-def]
    """:func:`sgd_all` over ``plan``'s chunks in parallel."""
    s = np.empty(4, ps[0].dtype)
    s[:] = scalars
    lr, mu, wd = s[0], s[1], s[3]
    nesterov = scalars[2] != 0
    out = np.zeros(plan.shape[0])
    for c in prange(plan.shape[0]):
        k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        if write:
            out[c] = float(sgd_apply(ps[k], gs[k], bufs[k], lo, hi, lr, mu, nesterov, wd))
        else:
            out[c] = 1.0 if sgd_check(ps[k], gs[k], bufs[k], lo, hi, lr, mu, nesterov, wd) else 0.0
    if write:
        return out.max()
    for c in range(plan.shape[0]):
        if out[c] != 0.0:
            return float(plan[c, 0])
    return -1.0


@_par
def adam_all_par(ps, gs, ms, vs, scalars, write, plan):  # type: ignore[no-untyped-def]
    """:func:`adam_all` over ``plan``'s chunks in parallel."""
    s = np.empty(8, ps[0].dtype)
    s[:] = scalars
    rows = np.zeros((plan.shape[0], 3))
    for c in prange(plan.shape[0]):
        k, lo, hi = plan[c, 0], plan[c, 1], plan[c, 2]
        if write:
            M, V, N = adam_apply(ps[k], gs[k], ms[k], vs[k], lo, hi, *_eight(s))
            rows[c, 0], rows[c, 1], rows[c, 2] = float(M), float(V), float(N)
        elif adam_check(ps[k], gs[k], ms[k], vs[k], lo, hi, *_eight(s)):
            rows[c, 0] = 1.0
    out = np.zeros(3)
    out[0] = -1.0
    if write:
        out[0], out[1], out[2] = rows[:, 0].max(), rows[:, 1].max(), rows[:, 2].min()
        return out
    for c in range(plan.shape[0]):
        if rows[c, 0] != 0.0:
            out[0] = float(plan[c, 0])
            return out
    return out


def chunk_plan(sizes: list[int], chunk: int) -> np.ndarray:
    """``(tensor, lo, hi)`` rows cutting tensors of ``sizes`` into chunks of at most ``chunk``
    elements (multiples of 64 but the last of each tensor), in order."""
    rows = [(k, lo, min(lo + chunk, n)) for k, n in enumerate(sizes) for lo in range(0, n, chunk)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)
