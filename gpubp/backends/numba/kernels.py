"""The Numba backend's fused elementwise kernels (``@njit``, serial, cached on disk).

Each kernel is one pass over its arrays, run while the data is hot after the GEMM that made it:

- :func:`bias_act`: ``z = f(z + b)`` in place on the forward GEMM's output ``(B, n)``;
- :func:`dact_mul`: ``g *= f'(a)`` in place on the backward GEMM's output, with the bias
  gradient ``db = sum over B of g`` in the same pass;
- :func:`output_delta`: loss value and ``delta^L`` in one pass per row, from ``z`` ``(B, n)``;
- :func:`absmax`, :func:`colsum`, :func:`has_nonfinite`: the remaining reductions (the
  optimizer kernels are in :mod:`.optim_kernels`);
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

import numpy as np
from numba import njit

from ...activations import ACTIVATION_IDS, LEAKY_SLOPE
from . import cache  # noqa: F401 - before any kernel: the cache goes to the user's folder
from .exp import fast_exp, like

IDENTITY = ACTIVATION_IDS["identity"]
SIGMOID = ACTIVATION_IDS["sigmoid"]
TANH = ACTIVATION_IDS["tanh"]
RELU = ACTIVATION_IDS["relu"]
LEAKY_RELU = ACTIVATION_IDS["leaky_relu"]
SOFTMAX = ACTIVATION_IDS["softmax"]
EXP = ACTIVATION_IDS["exp"]

#: Loss name -> id used by :func:`output_delta`.
LOSS_IDS: dict[str, int] = {
    "mse": 0,
    "cross_entropy": 1,
    "binary_cross_entropy": 2,
    "poisson": 3,
}
MSE, CROSS_ENTROPY, BCE, POISSON = 0, 1, 2, 3

# every kernel: cached on disk, releases the GIL, no ZeroDivisionError checks (IEEE results)
_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", cache=True, nogil=True, error_model="numpy")


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
    if act == EXP:
        return fast_exp(v)
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
    if act == EXP:
        return a
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
    cmax, bad = cm[:n], cm[n : 2 * n]  # two views, two loops: one loop over both ran 10x slower
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
        elif act == EXP:
            for j in range(n):
                row[j] = act_value(row[j] + b[j], EXP)
        else:
            for j in range(n):
                row[j] += b[j]
        if with_max:
            for j in range(n):
                cmax[j] = max(cmax[j], abs(row[j]))
            for j in range(n):
                bad[j] += row[j] - row[j]  # NaN exactly where the value is NaN or infinite
    if not with_max:
        return 0.0
    for j in range(n):
        if not bad[j] == 0:
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
    one = np.ones(1, g.dtype)[0]
    zero = one - one
    for i in range(B):
        grow = g[i]
        arow = a[i]
        # one loop per activation, its derivative a constant branch LLVM folds away: with
        # ``act`` tested inside the loop it ran unvectorised, 4x slower than the GEMM before it
        if act == RELU:  # times 1 or 0 of the dtype: the float64 product's bits, half the work
            for j in range(n):
                grow[j] *= one if arow[j] > zero else zero
        elif act == LEAKY_RELU:
            for j in range(n):
                grow[j] *= act_prime(arow[j], LEAKY_RELU)
        elif act == SIGMOID:
            for j in range(n):
                grow[j] *= act_prime(arow[j], SIGMOID)
        elif act == TANH:
            for j in range(n):
                grow[j] *= act_prime(arow[j], TANH)
        elif act == EXP:
            for j in range(n):
                grow[j] *= act_prime(arow[j], EXP)
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
    - poisson (exp): per element ``Y log Y - Y z - Y + exp(z)`` (``0 log 0 = 0``),
      ``delta = (exp(z) - Y) / B``;
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
            total += _ce_row(zr, orow, Y, i, lab, use_labels, inv_b)
        elif loss == BCE:
            total += _bce_row(zr, orow, Y, i, lab, use_labels, inv_b)
        elif loss == POISSON:
            total += _poisson_row(zr, orow, Y, i, lab, use_labels, inv_b)
        else:
            total += _mse_row(zr, orow, Y, i, lab, use_labels, inv_b, out_act)
        for j in range(n):
            dmax = max(dmax, abs(float(orow[j])))
            if with_db:
                db[j] += orow[j]
    return total * inv_b, dmax


@_inline
def _target(Y, i, j, lab, use_labels):  # type: ignore[no-untyped-def]
    """``Y[i, j]`` as a float: from the label (one-hot, never built) or the dense targets."""
    if use_labels:
        return 1.0 if j == lab else 0.0
    return float(Y[i, j])


@_inline
def _ce_row(zr, orow, Y, i, lab, use_labels, inv_b):  # type: ignore[no-untyped-def]
    """Softmax + cross-entropy of one row with dense targets: ``delta`` into ``orow``; the
    row's loss ``lse(z) sum_j Y_j - Y.z``."""
    n = zr.shape[0]
    m = _rowmax(zr)
    ysum = 0.0
    yz = 0.0
    for j in range(n):
        yj = _target(Y, i, j, lab, use_labels)
        ysum += yj
        yz += yj * (float(zr[j]) - float(m))
    for j in range(n):
        orow[j] = fast_exp(zr[j] - m)
    s = 0.0
    for j in range(n):
        s += float(orow[j])
    scale = 1.0 / s
    for j in range(n):
        orow[j] = (orow[j] * scale - _target(Y, i, j, lab, use_labels)) * inv_b
    return math.log(s) * ysum - yz


@_inline
def _bce_row(zr, orow, Y, i, lab, use_labels, inv_b):  # type: ignore[no-untyped-def]
    """Sigmoid + binary cross-entropy of one row: ``delta`` into ``orow``; the row's loss."""
    total = 0.0
    for j in range(zr.shape[0]):
        zj = zr[j]
        yj = _target(Y, i, j, lab, use_labels)
        zf = float(zj)
        total += (1.0 - yj) * max(zf, 0.0) - yj * min(zf, 0.0) + math.log1p(math.exp(-abs(zf)))
        orow[j] = (act_value(zj, SIGMOID) - yj) * inv_b
    return total


@_inline
def _poisson_row(zr, orow, Y, i, lab, use_labels, inv_b):  # type: ignore[no-untyped-def]
    """Exp + half the Poisson deviance of one row: ``delta`` into ``orow``; the row's loss."""
    total = 0.0
    for j in range(zr.shape[0]):
        zj = zr[j]
        yj = _target(Y, i, j, lab, use_labels)
        aj = act_value(zj, EXP)
        if yj > 0:
            total += yj * math.log(yj)
        total += float(aj) - yj * float(zj) - yj
        orow[j] = (aj - yj) * inv_b
    return total


@_inline
def _mse_row(zr, orow, Y, i, lab, use_labels, inv_b, out_act):  # type: ignore[no-untyped-def]
    """MSE of one row: ``delta = J_f^T (a - Y) / B`` into ``orow``; the row's loss."""
    n = zr.shape[0]
    total = 0.0
    for j in range(n):
        orow[j] = act_value(zr[j], out_act)
    if out_act == SOFTMAX:
        _softmax_row(orow)
        ga = 0.0
        for j in range(n):
            r = float(orow[j]) - _target(Y, i, j, lab, use_labels)
            total += 0.5 * r * r
            ga += r * inv_b * float(orow[j])
        for j in range(n):
            aj = float(orow[j])
            orow[j] = aj * ((aj - _target(Y, i, j, lab, use_labels)) * inv_b - ga)
        return total
    for j in range(n):
        aj = orow[j]
        r = float(aj) - _target(Y, i, j, lab, use_labels)
        total += 0.5 * r * r
        orow[j] = r * inv_b * act_prime(aj, out_act)
    return total


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
