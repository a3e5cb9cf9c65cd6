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
written: a loss that is not finite, a folded SGD step whose proof does not hold (the plain
path computes ``dW`` and checks it), or an update the check rejects. It returns the number of
steps done; the caller runs the next one the ordinary way, which decides it exactly as a step
alone would (and raises where the step is rejected). Every step's numbers are those of the
same step taken alone: the same kernels, in the same order.
"""

from __future__ import annotations

from numba import njit

from . import (
    cache,  # noqa: F401 - before any kernel: the cache goes to the user's folder
    pool,  # noqa: F401 - before any parallel kernel: the OpenMP layer
)
from .checked import adam_step, adam_step_par, sgd_step, sgd_step_par
from .layers import backprop, backprop_fold

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", error_model="numpy")


@_inline
def _gather(X, labels, Y, order, lo, a0, lab, Yb, n_out):  # type: ignore[no-untyped-def]
    """Rows ``order[lo : lo + B]`` of ``X`` into ``a0`` ``(B, n_0)``, their targets into
    ``lab`` (labels) or ``Yb`` (dense rows); False (the step not to be taken here) if a label
    is outside ``[0, n_out)``: the ordinary step refuses it, with nothing written."""
    B, n = a0.shape
    for i in range(B):
        r = order[lo + i]
        src, dst = X[r], a0[i]
        for j in range(n):
            dst[j] = src[j]
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


@_jit
def update_steps(  # type: ignore[no-untyped-def]
    X, labels, Y, order, start, count, a0, lab, Yb,
    Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm,
    adam, cols, wides, known, prove, lim, plan, losses, statuses, progress,
):  # fmt: skip
    """Up to ``count`` steps of backpropagation (:func:`.layers.backprop`) and the checked
    update (:mod:`.checked`: Adam where ``adam``, else SGD; on ``plan``'s chunks in parallel
    where it has rows). ``cols``: the flat ``(ps, gs, slot1, slot2)`` of the update (for SGD
    ``slot1`` is the momentum buffer, ``ps`` without momentum; ``slot2`` unused); step ``s``
    takes the rule's scalars ``wides[s]`` and the state's maxima in ``known`` (left there for
    the next step; its first entry is cleared before each step unless ``prove``). Each loss
    goes into ``losses[s]``, the update's status into ``statuses[s]`` and the steps written so
    far into ``progress[0]``. Returns the steps done."""
    B = a0.shape[0]
    ps, gs, m1, m2 = cols
    par = plan.shape[0] > 0
    for s in range(count):
        if not _gather(X, labels, Y, order, start + s * B, a0, lab, Yb, z.shape[1]):
            return s
        value, G = backprop(
            a0, lab, Yb, Ws, bs, acts, z, ds, dWs, dbs, hid, out_act, loss, cm, float(B)
        )
        if value - value != 0.0:
            return s
        if not prove:
            known[0] = 0.0
        if adam and par:
            status = adam_step_par(ps, gs, m1, m2, wides[s], G, known, lim, plan)
        elif adam:
            status = adam_step(ps, gs, m1, m2, wides[s], G, known, lim)
        elif par:
            status = sgd_step_par(ps, gs, m1, wides[s, :4], G, known, lim, plan)
        else:
            status = sgd_step(ps, gs, m1, wides[s, :4], G, known, lim)
        if status >= 0:
            return s
        losses[s] = value
        statuses[s] = status
        progress[0] = s + 1
    return count


__all__ = ["fold_steps", "update_steps"]
