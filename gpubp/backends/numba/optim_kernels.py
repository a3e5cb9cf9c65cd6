"""The Numba backend's optimizer kernels and the proof that a step is finite.

A step must change nothing when any new parameter or optimizer state would be NaN or infinite.
The update runs over flat 1-D views of the tensors, per range ``[lo, hi)`` (so that the backend
can split a tensor over its threads; the kernels release the GIL):

- ``*_apply``: computes the new values and writes them, and returns the new state's maxima
  (``max |buf'|``; ``max |m'|``, ``max v'``, ``min(0, min v')``), taken in the same loop;
- ``*_check``: computes the same values (same expressions, same order) without writing and
  returns whether any of them is not finite: the exact check, a second full pass;
- :func:`absmax`: ``max |x|`` (inf for NaN or infinity), one read pass;
- :func:`sumsq`: the sum of squares of a range (gradient norms), one read pass.

Before writing, the backend first tries the proof (:mod:`.checked`, which runs the whole step
in one kernel call): from ``G >= max |g|`` (the step's passes give it, or one read of the
gradients; a NaN or infinite gradient makes it inf, which fails the proof), the state's maxima
returned by the previous write pass, and ``P = max |p|`` only where the rule needs it. If the
proof fails (or the maxima are unknown), the exact check pass decides: every check before the
first write, so a rejected step leaves every tensor as it was.

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

Subnormal state is stored as zero. A moment or momentum buffer whose gradient stays zero (a
ReLU unit that no longer fires, an input feature that is constant) decays by ``b1`` or ``mu``
each step through the subnormal numbers (about 150 steps of them in float32 at 0.9; ``v`` at
``b2 = 0.999`` far longer), and every x86 operation on a vector that holds one takes a
microcode assist of about a hundred cycles. In the main job (Fashion-MNIST, Adam) a few
thousand of the 536,000 ``m`` entries are subnormal at any time, which cost the job about 7%
(3-11% between runs). So :func:`_kept` stores a new ``m``, ``v`` or ``buf`` below the dtype's
smallest normal number as zero: the value changes by less than that number (``2^-126`` in
float32). The parameter's step changes by at most ``alpha tiny / eps'`` from ``m`` and, from
``v``, by the relative amount ``sqrt(tiny) / eps'`` (``2^-63 / eps'`` in float32): both below
a parameter's last bit for ``eps'`` well above ``2^-40`` (the default ``eps = 1e-8``) unless the
parameter itself is below about ``1e-25``; with a tiny ``eps'`` the flush of ``v`` can change
the step of an entry whose gradient is below ``sqrt(tiny)``. NaN and infinity are kept (a
comparison with NaN is false), so the check still sees them. The check computes the same
flushed values as the write pass, so the two agree; the proof's bounds hold as they are (a
flush only lowers a magnitude, and ``v' >= 0`` stays true). The parameters, the gradients, the
generic fallback of :mod:`.update` (``out=`` arrays) and the other backends are left as they
are: the CUDA kernels flush float32 subnormals already (CuPy's ``-ftz=true``), and NumPy's
twelve passes per Adam step measured no faster with them flushed.

Rules (``torch.optim``'s; ``t`` the step, ``g`` the gradient):

- SGD: ``g' = g + wd p``; momentum ``buf = mu buf + g'``; ``p -= lr (g' + mu buf)``
  (Nesterov) or ``p -= lr buf``; without momentum ``p -= lr g'``.
- Adam / AdamW: ``g' = g + l2 p``; ``m = b1 m + (1 - b1) g'``; ``v = b2 v + (1 - b2) g'^2``
  (each kept, as ``buf`` is: see above);
  ``p = p shrink - m / (sqrt(v) + eps') alpha`` with ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``
  and ``eps' = eps sqrt(1 - b2^t)`` (the bias corrections folded into two scalars, as in the
  NumPy backend: ``lr / (1 - b1^t)`` alone can overflow where the step does not), and
  ``l2 = wd, shrink = 1`` (Adam) or ``l2 = 0, shrink = 1 - lr wd`` (AdamW).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from ...optim import adam_scalars as rule_scalars
from . import cache  # noqa: F401 - before any kernel: the cache goes to the user's folder

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", error_model="numpy")

#: Accumulators of a maximum taken inside a loop (a multiple of the widest SIMD register).
LANES = 32


@_inline
def _tiny(x):  # type: ignore[no-untyped-def]
    """The smallest normal number of ``x``'s dtype, as a scalar of that dtype."""
    t = np.empty(1, x.dtype)
    t[0] = np.finfo(x.dtype).tiny
    return t[0]


@_inline
def _kept(x, tiny):  # type: ignore[no-untyped-def]
    """A new state value as stored: ``x``, or zero where ``|x| < tiny`` (a subnormal number:
    see the module docstring). NaN and infinity are kept."""
    if abs(x) < tiny:
        return x - x
    return x


@_inline
def _momentum(b, gk, mu, tiny):  # type: ignore[no-untyped-def]
    """The new momentum buffer entry, as stored: ``mu b + g'``."""
    return _kept(mu * b + gk, tiny)


@_inline
def _moments(mk, vk, gk, b1, omb1, b2, omb2, tiny):  # type: ignore[no-untyped-def]
    """The new Adam moments ``(m', v')`` of one entry, as stored: ``b1 m + (1 - b1) g'`` and
    ``b2 v + (1 - b2) g'^2`` (the check and the write pass compute them here alike)."""
    return _kept(b1 * mk + omb1 * gk, tiny), _kept(b2 * vk + omb2 * (gk * gk), tiny)


@_jit
def sgd_check(p, g, buf, lo, hi, lr, mu, nesterov, wd):  # type: ignore[no-untyped-def]
    """Whether any of elements ``[lo, hi)`` would get a non-finite ``p`` or ``buf`` (nothing
    written). ``p``, ``g``, ``buf``: flat arrays of one dtype (``buf`` unused when ``mu`` is 0);
    the scalars are of that dtype."""
    p, g, buf = p[lo:hi], g[lo:hi], buf[lo:hi]
    bad = False
    tiny = _tiny(p)
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
            m = _momentum(buf[k], gk, mu, tiny)
            q = p[k] - lr * (gk + mu * m)
            d = (q - q) + (m - m)
            bad |= d != d
    else:
        for k in range(p.shape[0]):
            m = _momentum(buf[k], g[k] + wd * p[k], mu, tiny)
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
    tiny = _tiny(p)
    whole = n - n % LANES
    for s in range(0, whole, LANES):
        for j in range(LANES):
            acc[j] = max(acc[j], _sgd_one(p, g, buf, s + j, lr, mu, nesterov, wd, tiny))
    for k in range(whole, n):
        acc[0] = max(acc[0], _sgd_one(p, g, buf, k, lr, mu, nesterov, wd, tiny))
    return acc.max()


@_inline
def _sgd_one(p, g, buf, k, lr, mu, nesterov, wd, tiny):  # type: ignore[no-untyped-def]
    """The momentum step of element ``k``, written; returns ``|buf'|``."""
    gk = g[k] + wd * p[k]
    m = _momentum(buf[k], gk, mu, tiny)
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
    tiny = _tiny(p)
    for k in range(p.shape[0]):
        pk = p[k]
        gk = g[k] + l2 * pk
        mk, vk = _moments(m[k], v[k], gk, b1, omb1, b2, omb2, tiny)
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
    tiny = _tiny(p)
    whole = n - n % LANES
    for s in range(0, whole, LANES):
        for j in range(LANES):
            mk, vk = _adam_one(p, g, m, v, s + j, b1, omb1, b2, omb2, eps, alpha, shrink, l2, tiny)
            am[j] = max(am[j], abs(mk))
            av[j] = max(av[j], vk)
            an[j] = min(an[j], vk)
    for k in range(whole, n):
        mk, vk = _adam_one(p, g, m, v, k, b1, omb1, b2, omb2, eps, alpha, shrink, l2, tiny)
        am[0] = max(am[0], abs(mk))
        av[0] = max(av[0], vk)
        an[0] = min(an[0], vk)
    return am.max(), av.max(), an.min()


@_inline
def _adam_one(p, g, m, v, k, b1, omb1, b2, omb2, eps, alpha, shrink, l2, tiny):  # type: ignore[no-untyped-def]
    """The Adam step of element ``k``, written; returns ``(m', v')``."""
    pk = p[k]
    gk = g[k] + l2 * pk
    mk, vk = _moments(m[k], v[k], gk, b1, omb1, b2, omb2, tiny)
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


@_jit
def sumsq(x, lo, hi):  # type: ignore[no-untyped-def]
    """``sum x^2`` over elements ``[lo, hi)`` of flat ``x``, in float64 (LANES partial sums, so
    the loop vectorises)."""
    x = x[lo:hi]
    n = x.shape[0]
    acc = np.zeros(LANES)
    whole = n - n % LANES
    for s in range(0, whole, LANES):
        for j in range(LANES):
            v = float(x[s + j])
            acc[j] += v * v
    for k in range(whole, n):
        v = float(x[k])
        acc[0] += v * v
    return acc.sum()


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
