"""The Numba backend's fused elementwise kernels (``@njit``, serial, cached on disk).

Each kernel is one pass over its arrays, run while the data is hot after the GEMM that made it:

- :func:`bias_act`: ``z = f(z + b)`` in place on the forward GEMM's output ``(B, n)``;
- :func:`dact_mul`: ``g *= f'(a)`` in place on the backward GEMM's output, with the bias
  gradient ``db = sum over B of g`` in the same pass;
- :func:`output_delta`: loss value and ``delta^L`` in one pass per row, from ``z`` ``(B, n)``;
- :func:`colsum`, :func:`has_nonfinite`: the remaining reductions (the optimizer kernels
  are in :mod:`.numba_optim`);
- :func:`forward_layer`, :func:`hidden_delta`, :func:`weight_gradient`: a GEMM in NumPy's BLAS
  (see :mod:`.numba_blas`) and the pass that follows it, one call from Python per layer. They
  live in this module, next to the kernels they inline, because Numba's on-disk cache checks
  only the source file of the function it caches: a kernel inlined from another module could
  change without invalidating the cached caller.

The activation rules are written once, as scalar functions (:func:`act_value`,
:func:`act_prime`), and inlined into every loop that needs them; the activation id is a runtime
argument that is constant over each loop, so LLVM hoists the branch out of it (one compiled
specialisation per dtype, not per activation). Ids are those of :mod:`gpubp.activations`.

Loss values are accumulated in float64 whatever the dtype. No kernel uses ``fastmath``: the
reordering it allows would move results away from the reference by more than rounding in the
log-sum-exp and softplus terms, and the elementwise passes are memory-bound anyway.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ...activations import ACTIVATION_IDS, LEAKY_SLOPE
from . import cache  # noqa: F401 - before any kernel: the cache goes to the user's folder
from .gemm import gemm

IDENTITY = ACTIVATION_IDS["identity"]
SIGMOID = ACTIVATION_IDS["sigmoid"]
TANH = ACTIVATION_IDS["tanh"]
RELU = ACTIVATION_IDS["relu"]
LEAKY_RELU = ACTIVATION_IDS["leaky_relu"]
SOFTMAX = ACTIVATION_IDS["softmax"]

#: Loss name -> id used by :func:`output_delta`.
LOSS_IDS: dict[str, int] = {"mse": 0, "cross_entropy": 1, "binary_cross_entropy": 2}
MSE, CROSS_ENTROPY, BCE = 0, 1, 2

# every kernel: cached on disk, releases the GIL, no ZeroDivisionError checks (IEEE results)
_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", cache=True, nogil=True, error_model="numpy")


# --- a float32 exp that vectorises -------------------------------------------------------------
# Without SVML, Numba's np.exp is a libm call per element, which keeps every loop that calls it
# scalar. exp32 is branch-free (selects only): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2,
# Cephes' degree-6 polynomial for e^r, and 2^n built from its exponent bits in two halves so
# that results down to the smallest subnormal need no branch. Measured against exp in float64
# over [-110, 90]: at most 0.99 ulp for normal results, 0.75 of the smallest subnormal below;
# +inf above 88.7228, 0 below -103.972 and for -inf, NaN for NaN (as np.exp in float32).

_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI, _LN2_LO = _F32(0.693359375), _F32(-2.12194440e-4)
_EXP_HI, _EXP_LO = _F32(88.72283935546875), _F32(-103.97207708)
_EXP_P = tuple(
    _F32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1)
)
_HALF, _ONE, _ZERO, _INF = _F32(0.5), _F32(1.0), _F32(0.0), _F32(np.inf)
_BIAS, _MANT = np.int32(127), np.int32(23)  # float32 exponent bias, mantissa bits
_P0, _P1, _P2, _P3, _P4 = _EXP_P


@intrinsic
def _f32_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bit pattern is the int32 ``bits`` (an LLVM bitcast)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_from_bits: Any = _f32_from_bits  # (called with the bits only, as Numba does)


@_inline
def exp32(x):  # type: ignore[no-untyped-def]
    """``e^x`` for a float32 ``x``, within an ulp, without a branch or a call (see above)."""
    xc = x if x > _EXP_LO else _EXP_LO  # NaN becomes finite here (restored at the end)
    xc = xc if xc < _EXP_HI else _EXP_HI
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _P0 * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _HALF
    p = p * r * r + r + _ONE
    k = np.int32(n)
    k1 = k >> 1
    k2 = k - k1
    e = p * _from_bits((k1 + _BIAS) << _MANT) * _from_bits((k2 + _BIAS) << _MANT)
    e = e if x > _EXP_LO else _ZERO
    e = e if x < _EXP_HI else _INF
    return e if x == x else x


def fast_exp(x):  # type: ignore[no-untyped-def]
    """``e^x``: :func:`exp32` for float32 (vectorises), ``np.exp`` otherwise."""
    return np.exp(x)


@overload(fast_exp)
def _fast_exp_impl(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return _exp32_impl
    return _np_exp_impl


def _exp32_impl(x):  # type: ignore[no-untyped-def]
    return exp32(x)


def _np_exp_impl(x):  # type: ignore[no-untyped-def]
    return np.exp(x)


def like(x, v):  # type: ignore[no-untyped-def]
    """``v`` converted to the type of the scalar ``x`` (so float32 loops stay float32)."""
    return v


@overload(like)
def _like_impl(x, v):  # type: ignore[no-untyped-def]
    if x == types.float32:
        return _to_f32
    return _to_f64


def _to_f32(x, v):  # type: ignore[no-untyped-def]
    return np.float32(v)


def _to_f64(x, v):  # type: ignore[no-untyped-def]
    return np.float64(v)


@_inline
def _rowsum(row):  # type: ignore[no-untyped-def]
    """``sum(row)`` with four running sums (a float sum does not vectorise without
    reassociation; four independent chains at least run in parallel)."""
    n = row.shape[0]
    s0 = row[0] * 0
    s1 = s0
    s2 = s0
    s3 = s0
    j = 0
    while j + 3 < n:
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        j += 4
    while j < n:
        s0 += row[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


@_inline
def _rowmax(row):  # type: ignore[no-untyped-def]
    """``max(row)`` (``n >= 1``) with two running maxima."""
    n = row.shape[0]
    m0 = row[0]
    m1 = row[0]
    j = 1
    while j + 1 < n:
        m0 = max(m0, row[j])
        m1 = max(m1, row[j + 1])
        j += 2
    if j < n:
        m0 = max(m0, row[j])
    return max(m0, m1)


@_inline
def act_value(v, act):  # type: ignore[no-untyped-def]
    """``f(v)`` for an elementwise activation id (softmax is handled per row by the callers)."""
    if act == RELU:
        return 0.0 if v < 0 else v  # NaN passes through, as np.maximum does
    if act == LEAKY_RELU:
        return v if v > 0 else v * LEAKY_SLOPE
    if act == SIGMOID:
        return 1 / (1 + fast_exp(-v))  # exp overflow gives the exact limit 0
    if act == TANH:
        return np.tanh(v)
    return v


@_inline
def act_prime(a, act):  # type: ignore[no-untyped-def]
    """``f'(z)`` written with the output ``a = f(z)`` (see :mod:`gpubp.activations`)."""
    if act == RELU:
        return 1.0 if a > 0 else 0.0
    if act == LEAKY_RELU:
        return 1.0 if a > 0 else LEAKY_SLOPE
    if act == SIGMOID:
        return a * (1 - a)
    if act == TANH:
        return 1 - a * a
    return 1.0


@_jit
def bias_act(z, b, act, cm):  # type: ignore[no-untyped-def]
    """``z = f(z + b)`` in place: ``(B, n) + (n,)``; softmax normalises each row.

    If ``cm`` has at least ``2 n`` entries, returns ``max |f(z + b)|`` (kept per column in
    ``cm`` so the loop still vectorises; inf if a value is NaN or infinite, so the maximum is
    a bound a proof may rely on), else 0. One loop per activation: a branch or a math
    call inside the inner loop would stop LLVM from vectorising it.
    """
    B, n = z.shape
    if act == SOFTMAX:  # a loop of its own: inlined into the one below it slowed the others
        for i in range(B):
            row = z[i]
            for j in range(n):
                row[j] += b[j]
            _softmax_row(row)
        return 0.0
    with_max = cm.shape[0] >= 2 * n and n > 0
    if with_max:
        cm[: 2 * n] = 0
    for i in range(B):
        row = z[i]
        if act == RELU:
            for j in range(n):
                row[j] = act_value(row[j] + b[j], RELU)
        elif act == LEAKY_RELU:
            for j in range(n):
                row[j] = act_value(row[j] + b[j], LEAKY_RELU)
        elif act == SIGMOID:
            for j in range(n):
                row[j] = act_value(row[j] + b[j], SIGMOID)
        elif act == TANH:
            for j in range(n):
                row[j] = act_value(row[j] + b[j], TANH)
        else:
            for j in range(n):
                row[j] += b[j]
        if with_max:
            for j in range(n):
                a = abs(row[j])
                cm[j] = max(cm[j], a)
                cm[n + j] += a - a  # NaN exactly where the value is NaN or infinite
    if not with_max:
        return 0.0
    for j in range(n):
        if not cm[n + j] == 0:
            return np.inf
    return _max(cm[:n])


@_jit
def absmax(x, cm):  # type: ignore[no-untyped-def]
    """``max |x|`` over ``(B, n)``, with ``cm`` (``2 n`` entries or more) as per-column scratch;
    inf if ``x`` holds NaN or infinity (``x - x`` is NaN exactly there)."""
    B, n = x.shape
    cmax = cm[:n]
    bad = cm[n : 2 * n]
    cmax[:] = 0
    bad[:] = 0
    for i in range(B):
        row = x[i]
        for j in range(n):
            cmax[j] = max(cmax[j], abs(row[j]))
        for j in range(n):
            bad[j] += row[j] - row[j]
    for j in range(n):
        if not bad[j] == 0:
            return np.inf
    return _max(cmax)


@_inline
def _max(cm):  # type: ignore[no-untyped-def]
    m = 0.0
    for j in range(cm.shape[0]):
        m = max(m, float(cm[j]))
    return m


@_inline
def _softmax_row(row):  # type: ignore[no-untyped-def]
    """``row = softmax(row)`` in place (three passes: max, exp, scale); returns the sum."""
    n = row.shape[0]
    m = _rowmax(row)
    for j in range(n):
        row[j] = fast_exp(row[j] - m)  # a loop of its own: it vectorises for float32
    s = _rowsum(row)
    inv = 1 / s
    for j in range(n):
        row[j] *= inv
    return s


@_jit
def dact_mul(g, a, act, db, cm):  # type: ignore[no-untyped-def]
    """``g *= f'(a)`` in place ``(B, n)``; if ``db`` has ``n`` entries, ``db = sum_B g`` too.

    If ``cm`` has at least ``n`` entries, returns ``max |g|`` after the product (else 0).
    """
    B, n = g.shape
    with_db = db.shape[0] == n
    with_max = cm.shape[0] >= n and n > 0
    if with_db:
        db[:] = 0
    if with_max:
        cm[:n] = 0
    for i in range(B):
        grow = g[i]
        arow = a[i]
        if act != IDENTITY:
            for j in range(n):
                grow[j] *= act_prime(arow[j], act)
        if with_db:
            for j in range(n):
                db[j] += grow[j]
        if with_max:
            for j in range(n):
                cm[j] = max(cm[j], abs(grow[j]))
    return _max(cm[:n]) if with_max else 0.0


@_jit
def colsum(d, db):  # type: ignore[no-untyped-def]
    """``db = sum over B of d``: ``(B, n) -> (n,)``, row by row so the reads stay contiguous."""
    B, n = d.shape
    db[:] = 0
    for i in range(B):
        row = d[i]
        for j in range(n):
            db[j] += row[j]
    return db


@_jit
def output_delta(z, Y, labels, out_act, loss, out, db, batch):  # type: ignore[no-untyped-def]
    """Loss value ``C`` and ``delta^L`` (into ``out``, which may be ``z``), one pass per row.

    ``z``: ``(B, n)`` output pre-activation. Targets: ``labels`` ``(B,)`` int64 class indices
    when it has ``B`` entries (one-hot rows, never built), else the dense ``Y`` ``(B, n)``.
    If ``db`` has ``n`` entries it receives ``sum over B of delta^L`` in the same pass.
    ``batch``: the size of the batch the mean is taken over, ``B`` itself or more when ``z``
    is one part of a batch split over threads (the parts' values then add up to the whole
    batch's, and each ``delta`` row is the whole batch's).

    - cross-entropy (softmax): per row ``lse(z) sum_j Y_j - Y.z``, ``delta = (softmax - Y)/B``;
    - binary cross-entropy (sigmoid): per element
      ``(1 - y) max(z, 0) - y min(z, 0) + log1p(exp(-|z|))``, ``delta = (sigmoid - y)/B``;
      written that way no large terms cancel when ``z`` is confidently right;
    - mse: ``(a - Y)^2 / 2`` and ``delta = J_f^T (a - Y) / B``.

    Returns ``(C, max |delta^L|)`` as float64 (``C``: these rows' loss sum over ``batch``).
    Raises ValueError for a label outside ``[0, n)``.
    """
    B, n = z.shape
    use_labels = labels.shape[0] == B and B > 0
    with_db = db.shape[0] == n
    if with_db:
        db[:] = 0
    inv_b = 1.0 / batch
    if loss == CROSS_ENTROPY and use_labels:
        return _ce_labels(z, labels, out, db, with_db, inv_b)
    total = 0.0
    dmax = 0.0
    for i in range(B):
        zr = z[i]
        orow = out[i]
        lab = -1
        if use_labels:
            lab = labels[i]
            if lab < 0 or lab >= n:
                raise ValueError("a label is outside [0, n_outputs)")
        if loss == CROSS_ENTROPY:
            m = _rowmax(zr)
            ysum = 0.0
            yz = 0.0
            for j in range(n):
                yj = (1.0 if j == lab else 0.0) if use_labels else float(Y[i, j])
                ysum += yj
                yz += yj * (float(zr[j]) - float(m))
            for j in range(n):
                orow[j] = fast_exp(zr[j] - m)
            s = 0.0
            for j in range(n):
                s += float(orow[j])
            total += math.log(s) * ysum - yz
            scale = 1.0 / s
            for j in range(n):
                yj = (1.0 if j == lab else 0.0) if use_labels else float(Y[i, j])
                orow[j] = (orow[j] * scale - yj) * inv_b
        elif loss == BCE:
            for j in range(n):
                zj = zr[j]
                yj = (1.0 if j == lab else 0.0) if use_labels else float(Y[i, j])
                zf = float(zj)
                total += (
                    (1.0 - yj) * max(zf, 0.0) - yj * min(zf, 0.0) + math.log1p(math.exp(-abs(zf)))
                )
                orow[j] = (act_value(zj, SIGMOID) - yj) * inv_b
        else:  # mse
            for j in range(n):
                orow[j] = act_value(zr[j], out_act)
            if out_act == SOFTMAX:
                _softmax_row(orow)
                ga = 0.0
                for j in range(n):
                    yj = (1.0 if j == lab else 0.0) if use_labels else float(Y[i, j])
                    r = float(orow[j]) - yj
                    total += 0.5 * r * r
                    ga += r * inv_b * float(orow[j])
                for j in range(n):
                    yj = (1.0 if j == lab else 0.0) if use_labels else float(Y[i, j])
                    aj = float(orow[j])
                    orow[j] = aj * ((aj - yj) * inv_b - ga)
            else:
                for j in range(n):
                    yj = (1.0 if j == lab else 0.0) if use_labels else float(Y[i, j])
                    aj = orow[j]
                    r = float(aj) - yj
                    total += 0.5 * r * r
                    orow[j] = r * inv_b * act_prime(aj, out_act)
        for j in range(n):
            dmax = max(dmax, abs(float(orow[j])))
            if with_db:
                db[j] += orow[j]
    return total * inv_b, dmax


@_inline
def _ce_labels(z, labels, out, db, with_db, inv_b):  # type: ignore[no-untyped-def]
    """:func:`output_delta` for softmax + cross-entropy with labels, in a loop of its own. Per
    one-hot row ``C_i = lse(z) - z_lab``, ``delta = softmax(z) / B`` minus ``1 / B`` at the
    label."""
    B, n = z.shape
    total = 0.0
    for i in range(B):
        zr = z[i]
        orow = out[i]
        lab = labels[i]
        if lab < 0 or lab >= n:
            raise ValueError("a label is outside [0, n_outputs)")
        zl = float(zr[lab])  # read before the row is overwritten (out may be z)
        m = _rowmax(zr)
        for j in range(n):
            orow[j] = fast_exp(zr[j] - m)  # a loop of its own: it vectorises for float32
        s = _rowsum(orow)
        total += math.log(float(s)) + float(m) - zl
        scale = like(s, inv_b / float(s))
        for j in range(n):
            orow[j] *= scale
        orow[lab] -= inv_b
        if with_db:
            for j in range(n):
                db[j] += orow[j]
    # |softmax - onehot| / B <= 1 / B: the bound on |delta| needs no pass
    return total * inv_b, inv_b


@_jit
def has_nonfinite(x):  # type: ignore[no-untyped-def]
    """Whether ``x`` holds NaN or infinity: ``x - x`` is NaN exactly there (branch-free loop)."""
    flat = x.reshape(x.size)
    count = 0  # an integer sum vectorises; a float one would not (no reassociation allowed)
    for k in range(flat.shape[0]):
        count += (flat[k] - flat[k]) != 0
    return count > 0


@_jit
def forward_layer(a_prev, W, b, act, out, cm):  # type: ignore[no-untyped-def]
    """``out = f(a_prev @ W.T + b)``: GEMM ``(B, n_in) @ (n_out, n_in).T``, then bias and
    activation in one pass over ``out`` ``(B, n_out)`` while it is in cache. Returns
    ``max |out|`` if ``cm`` has ``n_out`` entries (see :func:`bias_act`), else 0."""
    B, n_in = a_prev.shape
    n_out = W.shape[0]
    gemm(False, True, B, n_out, n_in, 1.0, a_prev, n_in, W, n_in, 0.0, out, n_out)
    return bias_act(out, b, act, cm)


@_jit
def hidden_delta(delta_next, W_next, a, act, out, db, cm):  # type: ignore[no-untyped-def]
    """``out = (delta_next @ W_next) * f'(a)``: GEMM ``(B, n_next) @ (n_next, n)``, then the
    Hadamard product in place, and ``db = sum over B of out`` when ``db`` has ``n`` entries.
    Returns ``max |out|`` if ``cm`` has ``n`` entries, else 0."""
    B, n_next = delta_next.shape
    n = W_next.shape[1]
    gemm(False, False, B, n, n_next, 1.0, delta_next, n_next, W_next, n, 0.0, out, n)
    return dact_mul(out, a, act, db, cm)


@_jit
def weight_gradient(delta, a_prev, dW, alpha, beta):  # type: ignore[no-untyped-def]
    """``dW = alpha delta.T @ a_prev + beta dW``: ``(n_out, B) @ (B, n_in)``.

    With ``alpha = -lr`` and ``beta = 1`` and ``dW`` the weights, this is the SGD step folded
    into the GEMM."""
    B, n_out = delta.shape
    n_in = a_prev.shape[1]
    gemm(True, False, n_out, n_in, B, alpha, delta, n_out, a_prev, n_in, beta, dW, n_in)
    return dW


@_jit
def matmul(a, b, out, ta, tb):  # type: ignore[no-untyped-def]
    """``out = op(a) @ op(b)`` through the GEMM provider (``ta``, ``tb``: transpose flags): the
    benchmarks' floor, the very GEMM the kernels above call."""
    M, N = out.shape
    K_ = a.shape[0] if ta else a.shape[1]
    gemm(ta, tb, M, N, K_, 1.0, a, a.shape[1], b, b.shape[1], 0.0, out, N)
    return out


# --- the whole backward pass in one call ------------------------------------------------------
# A small network's step is short enough that Python between the kernels shows: [784, 128, 10]
# at batch 64 spends about as long in the calls between the GEMMs as in the GEMMs. These take
# the layers as tuples, so one call runs every layer.


@_jit
def backprop(a0, labels, Y, Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm, batch):  # type: ignore[no-untyped-def]
    """Forward, ``delta^L``, every delta and every ``dW``, ``db`` in one call; returns
    ``(C, G)`` with ``G >= max |g|`` over every gradient (inf if one may not be finite).

    ``Ws``, ``bs``: the ``L`` layers' weights and biases; ``acts``: ``a^1 .. a^{L-1}``;
    ``ds``: ``delta^1 .. delta^{L-1}``; ``z``: ``(B, n_L)``, the output, then ``delta^L``;
    ``cm``: ``2 max(n)`` scratch. ``G`` bounds ``|dW^l|`` by ``B max|delta^l| max|a^{l-1}|``
    (the maxima the passes take; ``max |a|`` is inf for a NaN or infinity) and takes
    ``max |db|`` exactly (a finite ``db`` column means finite deltas in it).
    """
    L = len(Ws)
    no_max = cm[:0]
    amax = np.empty(L)
    amax[0] = absmax(a0, cm)
    prev = a0
    for i in range(L - 1):
        amax[i + 1] = forward_layer(prev, Ws[i], bs[i], hid, acts[i], cm)
        prev = acts[i]
    forward_layer(prev, Ws[L - 1], bs[L - 1], IDENTITY, z, no_max)
    value, dmax = output_delta(z, Y, labels, out_act, loss, z, dbs[L - 1], batch)
    G = 0.0
    delta = z
    for i in range(L - 1, -1, -1):
        a_prev = a0 if i == 0 else acts[i - 1]
        G = _at_least(G, batch * dmax * amax[i])
        weight_gradient(delta, a_prev, dWs[i], 1.0, 0.0)
        if i > 0:
            dmax = hidden_delta(delta, Ws[i], a_prev, hid, ds[i - 1], dbs[i - 1], cm)
            delta = ds[i - 1]
    for i in range(L):
        db = dbs[i]
        G = _at_least(G, absmax(db.reshape((1, db.shape[0])), cm))
    return value, G


@_inline
def _at_least(G, x):  # type: ignore[no-untyped-def]
    """``max(G, x)``, inf if ``x`` is NaN (``0 * inf``: a zero delta times an infinite
    activation bounds nothing)."""
    if x != x:
        return np.inf
    return max(G, x)
