"""The Numba backend's layer kernels: a GEMM from the provider (:mod:`.gemm`) and the pass of
:mod:`.kernels` that follows it while its output is in cache, one call from Python per layer
(:func:`forward_layer`, :func:`hidden_delta`, :func:`weight_gradient`), or every layer in one
call (:func:`backprop`); and :func:`matmul`, the provider's GEMM alone (the benchmarks' floor).

The kernels of :mod:`.kernels` are inlined here; the cache folder is named by a hash of every
kernel module (:mod:`.cache`), so a change there is never hidden by a cached caller.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import cache  # noqa: F401 - before any kernel: the cache goes to the user's folder
from .gemm import gemm
from .kernels import IDENTITY, absmax, bias_act, dact_mul, output_delta
from .optim_kernels import sgd_apply, sgd_check

_jit = njit(cache=True, nogil=True, error_model="numpy")
_inline = njit(inline="always", cache=True, nogil=True, error_model="numpy")


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


@_inline
def _forward(a0, Ws, bs, acts, z, hid, cm, amax):  # type: ignore[no-untyped-def]
    """Every layer's forward pass, ``max |a^l|`` into ``amax`` (``a^0`` included)."""
    L = len(Ws)
    amax[0] = absmax(a0, cm)
    prev = a0
    for i in range(L - 1):
        amax[i + 1] = forward_layer(prev, Ws[i], bs[i], hid, acts[i], cm)
        prev = acts[i]
    forward_layer(prev, Ws[L - 1], bs[L - 1], IDENTITY, z, cm[:0])


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
    amax = np.empty(L)
    _forward(a0, Ws, bs, acts, z, hid, cm, amax)
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


@_jit
def backprop_fold(a0, labels, Y, Ws, bs, acts, z, ds, dbs, hid, out_act, loss, cm, batch, sgd):  # type: ignore[no-untyped-def]
    """Plain SGD folded into the gradient GEMMs, ``W = -lr delta.T @ a_prev + (1 - lr wd) W``,
    in one call: forward, every delta and ``db``, then, only where it provably cannot produce
    NaN or infinity, every layer's weights and biases updated. Returns ``(C, done)``; where
    ``done`` is false nothing was written, and the deltas and ``db`` are left for the plain
    update.

    ``sgd``: float64 ``(lr, weight_decay, lr_ok, change)``: ``lr_ok`` 1 where ``lr`` is a finite
    number of the dtype (``-lr`` is the GEMM's alpha), ``change`` the dtype's bound on a change
    (``2^-60`` of its largest number). Safe means: the loss and every new bias are finite (so
    every ``db`` and delta is), and ``lr B max|delta^l| max|a^{l-1}|`` and
    ``B max|delta^l| max|a^{l-1}|`` are at most ``change`` for every layer (so ``|W - lr dW|``
    cannot round past the largest number).
    """
    L = len(Ws)
    amax = np.empty(L)
    _forward(a0, Ws, bs, acts, z, hid, cm, amax)
    value, dmax = output_delta(z, Y, labels, out_act, loss, z, dbs[L - 1], batch)
    lr, wd, lr_ok, limit = sgd[0], sgd[1], sgd[2] != 0.0, sgd[3]
    safe = lr_ok and value - value == 0.0
    delta = z
    for i in range(L - 1, -1, -1):
        bound = batch * dmax * amax[i]
        safe = safe and bound <= limit and lr * bound <= limit
        if i > 0:
            dmax = hidden_delta(delta, Ws[i], acts[i - 1], hid, ds[i - 1], dbs[i - 1], cm)
            delta = ds[i - 1]
    s = np.empty(2, Ws[0].dtype)
    s[0], s[1] = lr, wd
    zero = s[0] - s[0]
    for i in range(L):  # the new biases are checked (nothing written) before anything changes
        b = bs[i]
        if safe and sgd_check(b, dbs[i], b, 0, b.shape[0], s[0], zero, False, s[1]):
            safe = False
    if not safe:
        return value, False
    shrink = 1.0 - lr * wd
    for i in range(L):
        delta = z if i == L - 1 else ds[i]
        weight_gradient(delta, a0 if i == 0 else acts[i - 1], Ws[i], -lr, shrink)
        b = bs[i]
        sgd_apply(b, dbs[i], b, 0, b.shape[0], s[0], zero, False, s[1])
    return value, True


@_inline
def _at_least(G, x):  # type: ignore[no-untyped-def]
    """``max(G, x)``, inf if ``x`` is NaN (``0 * inf``: a zero delta times an infinite
    activation bounds nothing)."""
    if x != x:
        return np.inf
    return max(G, x)
