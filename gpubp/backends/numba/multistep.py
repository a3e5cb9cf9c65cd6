"""Many training steps in one kernel call: each batch gathered from the whole training set,
then the one-call step of :mod:`.layers` and, where the update is not folded into the GEMMs,
the checked update of :mod:`.checked`, with no Python between the steps.

``X`` ``(N, n_0)`` is the training set and ``order`` ``(M,)`` int64 the rows of an epoch in
the order they are taken: step ``s`` of a call trains on rows
``order[start + s B : start + (s + 1) B]``, gathered into the workspace's ``a0`` (and its
labels, or its target rows, into ``lab`` or ``Yb``). Targets are int64 class labels
``labels`` ``(N,)`` (with an empty ``Y``) or dense rows ``Y`` ``(N, n_L)`` (with empty
``labels``), as :meth:`.backend.NumbaBackend._split_targets` gives them for a batch.

A call stops before the first step it cannot finish on its own, with nothing of that step
written: a label out of range, a loss that is not finite, a folded SGD step whose proof does
not hold (the plain path computes ``dW`` and checks it), or an update the check rejects. It
returns the number of steps done; the caller runs the next one the ordinary way, which decides
it exactly as a step alone would (and raises where the step is rejected). Every step's numbers
are those of the same step taken alone: the same kernels, in the same order.
"""

from __future__ import annotations

from numba import njit, prange

from . import (
    cache,  # noqa: F401 - before any kernel: the cache goes to the user's folder
    pool,  # noqa: F401 - before any parallel kernel: the OpenMP layer
)
from .checked import adam_step, adam_step_par, sgd_step, sgd_step_par
from .layers import backprop, backprop_fold

_jit = njit(cache=True, nogil=True, error_model="numpy")
_par = njit(cache=True, nogil=True, error_model="numpy", parallel=True)
_inline = njit(inline="always", error_model="numpy")


@_par
def _rows(X, order, lo, a0):  # type: ignore[no-untyped-def]
    """Rows ``order[lo : lo + B]`` of ``X`` into ``a0`` ``(B, n_0)``, in parts over the threads:
    the rows come from all over a large training set, and two threads keep twice the reads in
    flight (a 128 x 784 float32 batch from 60,000 rows: 60 us on one thread, 34 us on two)."""
    B, n = a0.shape
    parts = min(8, B)
    h = -(-B // parts)
    for t in prange(-(-B // h)):
        for i in range(t * h, min(B, (t + 1) * h)):
            src, dst = X[order[lo + i]], a0[i]
            for j in range(n):
                dst[j] = src[j]


@_inline
def _gather(X, labels, Y, order, lo, a0, lab, Yb, n_out):  # type: ignore[no-untyped-def]
    """Rows ``order[lo : lo + B]`` of ``X`` into ``a0`` ``(B, n_0)``, their targets into
    ``lab`` (labels) or ``Yb`` (dense rows); False (the step not to be taken here) if a label
    is outside ``[0, n_out)``: the ordinary step refuses it, with nothing written."""
    _rows(X, order, lo, a0)
    B = a0.shape[0]
    if labels.shape[0]:
        for i in range(B):
            c = labels[order[lo + i]]
            if c < 0 or c >= n_out:
                return False
            lab[i] = c
    else:
        m = Yb.shape[1]
        for i in range(B):
            src, dst = Y[order[lo + i]], Yb[i]
            for j in range(m):
                dst[j] = src[j]
    return True


@_jit
def fold_steps(  # type: ignore[no-untyped-def]
    X, labels, Y, order, start, count, a0, lab, Yb,
    Ws, bs, acts, z, ds, dbs, hid, out_act, loss, cm, sgds, losses, progress,
):  # fmt: skip
    """Up to ``count`` plain-SGD steps folded into the gradient GEMMs
    (:func:`.layers.backprop_fold`), step ``s`` with the scalars ``sgds[s]``; each loss into
    ``losses[s]`` and the steps written so far into ``progress[0]`` (read it even where the
    call is interrupted). Returns the steps done."""
    B = a0.shape[0]
    for s in range(count):
        if not _gather(X, labels, Y, order, start + s * B, a0, lab, Yb, z.shape[1]):
            return s
        value, done = backprop_fold(
            a0, lab, Yb, Ws, bs, acts, z, ds, dbs, hid, out_act, loss, cm, float(B), sgds[s]
        )
        if not done:
            return s
        losses[s] = value
        progress[0] = s + 1
    return count


@_inline
def _gradients(  # type: ignore[no-untyped-def]
    X, labels, Y, order, lo, a0, lab, Yb,
    Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm, known, prove,
):  # fmt: skip
    """The batch at ``order[lo:]`` gathered and every gradient of it (:func:`.layers.backprop`);
    ``(ok, C, G)``, ``ok`` false where the step is not to be taken here (a label out of range,
    a loss that is not finite). ``known[0]`` is cleared unless ``prove``."""
    if not _gather(X, labels, Y, order, lo, a0, lab, Yb, z.shape[1]):
        return False, 0.0, 0.0
    value, G = backprop(
        a0, lab, Yb, Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm, float(a0.shape[0])
    )
    if value - value != 0.0:
        return False, value, G
    if not prove:
        known[0] = 0.0
    return True, value, G


@_inline
def _written(s, value, status, losses, statuses, progress):  # type: ignore[no-untyped-def]
    """Whether step ``s``'s update was written (``status < 0``); its loss and status kept."""
    if status >= 0:
        return False
    losses[s] = value
    statuses[s] = status
    progress[0] = s + 1
    return True


@_jit
def adam_steps(  # type: ignore[no-untyped-def]
    X, labels, Y, order, start, count, a0, lab, Yb,
    Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm,
    cols, wides, known, prove, lim, plan, losses, statuses, progress,
):  # fmt: skip
    """Up to ``count`` steps of backpropagation (:func:`.layers.backprop`) and the checked Adam
    update (:func:`.checked.adam_step`, on ``plan``'s chunks in parallel where it has rows).
    ``cols``: the flat ``(ps, gs, ms, vs)`` of the update; step ``s`` takes the rule's scalars
    ``wides[s]`` (8) and the state's maxima in ``known`` (left there for the next step; its
    first entry is cleared before each step unless ``prove``). Each loss goes into
    ``losses[s]``, the update's status into ``statuses[s]`` and the steps written so far into
    ``progress[0]``. Returns the steps done.

    A kernel per rule (with :func:`sgd_steps`), so that a run compiles only its own rule's
    update."""
    B = a0.shape[0]
    ps, gs, ms, vs = cols
    for s in range(count):
        ok, value, G = _gradients(
            X, labels, Y, order, start + s * B, a0, lab, Yb,
            Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm, known, prove,
        )  # fmt: skip
        if not ok:
            return s
        if plan.shape[0]:
            status = adam_step_par(ps, gs, ms, vs, wides[s], G, known, lim, plan)
        else:
            status = adam_step(ps, gs, ms, vs, wides[s], G, known, lim)
        if not _written(s, value, status, losses, statuses, progress):
            return s
    return count


@_jit
def sgd_steps(  # type: ignore[no-untyped-def]
    X, labels, Y, order, start, count, a0, lab, Yb,
    Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm,
    cols, wides, known, prove, lim, plan, losses, statuses, progress,
):  # fmt: skip
    """:func:`adam_steps` for the checked SGD update (:func:`.checked.sgd_step`): ``cols`` the
    flat ``(ps, gs, bufs)`` (``bufs`` is ``ps`` without momentum), ``wides[s]`` its 4
    scalars."""
    B = a0.shape[0]
    ps, gs, bufs = cols
    for s in range(count):
        ok, value, G = _gradients(
            X, labels, Y, order, start + s * B, a0, lab, Yb,
            Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm, known, prove,
        )  # fmt: skip
        if not ok:
            return s
        if plan.shape[0]:
            status = sgd_step_par(ps, gs, bufs, wides[s], G, known, lim, plan)
        else:
            status = sgd_step(ps, gs, bufs, wides[s], G, known, lim)
        if not _written(s, value, status, losses, statuses, progress):
            return s
    return count


__all__ = ["adam_steps", "fold_steps", "sgd_steps"]
