"""What is particular to the numba backend: its fused kernels against the float64 reference, the
SGD step folded into the gradient GEMM, ``threads=``, the no-BLAS fallback, allocation-free
steps (NumPy's and Numba's own allocator) and the on-disk JIT cache.

The backend-vs-reference matrix itself runs for numba through ``conftest.backend_name``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpubp
from gpubp import optim
from gpubp import reference as ref
from gpubp.backends import OPS, Backend
from gpubp.check import TOLERANCE, check_configuration, rel_error

pytest.importorskip("numba")

from gpubp.backends.numba import NumbaBackend, layers
from gpubp.backends.numba import checked as C
from gpubp.backends.numba import exp as E
from gpubp.backends.numba import gemm as numba_blas
from gpubp.backends.numba import kernels as K
from gpubp.backends.numba import optim_kernels as O

ACT = gpubp.activations.ACTIVATION_IDS
HIDDEN = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")


def _close(got, expected, dtype, factor=1.0):
    err = rel_error(np.asarray(got, dtype=np.float64), expected)
    assert err <= factor * TOLERANCE[dtype], f"relative error {err:.3g}"


# --- the protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_signatures_match_reference(op):
    from .test_backends import test_backend_signatures_match_reference

    test_backend_signatures_match_reference(NumbaBackend, op)


def test_registered_and_picked_by_auto_without_a_gpu():
    assert gpubp.backend_status()["numba"] is None
    be = gpubp.get_backend("numba")
    assert isinstance(be, NumbaBackend)
    if gpubp.backend_status()["cupy"] is not None:
        assert gpubp.get_backend("auto") is be


# --- fused kernels against the reference -------------------------------------------------------


@pytest.mark.parametrize("activation", [*HIDDEN, "softmax"])
def test_bias_act_matches_reference(activation, dtype, rng):
    z = (3 * rng.standard_normal((7, 33))).astype(dtype)
    b = rng.standard_normal(33).astype(dtype)
    expected = ref.activate(z.astype(np.float64) + b, activation)
    cm = np.empty(2 * 33, dtype=dtype)  # the maximum and its NaN test
    m = K.bias_act(z, b, ACT[activation], cm)
    _close(z, expected, dtype)
    if activation != "softmax":
        assert m == pytest.approx(np.abs(expected).max(), rel=1e-5)


@pytest.mark.parametrize("activation", HIDDEN)
def test_dact_mul_matches_reference_with_db_and_max(activation, dtype, rng):
    zf = 2 * rng.standard_normal((9, 17))
    a = ref.activate(zf, activation).astype(dtype)
    g = rng.standard_normal((9, 17)).astype(dtype)
    expected = g.astype(np.float64) * ref.derivative_from_output(a.astype(np.float64), activation)
    db = np.empty(17, dtype=dtype)
    cm = np.empty(17, dtype=dtype)
    m = K.dact_mul(g, a, ACT[activation], db, cm)
    _close(g, expected, dtype)
    _close(db, expected.sum(axis=0), dtype)
    assert m == pytest.approx(np.abs(expected).max(), rel=1e-5)


def test_dact_mul_relu_keeps_nan_infinity_and_signed_zeros(dtype, rng):
    """The ReLU derivative is a product by 1 or 0, never a select: a NaN or an infinite ``g``
    in a dead unit stays NaN (so the step's proof sees it), and every value has the bits of the
    float64 product ``g * f'(a)`` (widths 1, 33 and 200: the vector loop and its tail)."""
    for n in (1, 33, 200):
        g = rng.standard_normal((5, n)).astype(dtype)
        a = rng.standard_normal((5, n)).astype(dtype)
        a[0, 0], a[1, 0] = 0.0, -0.0  # the kink: f'(0) = 0
        g[2, 0], g[3, 0], g[4, 0] = np.nan, np.inf, -0.0
        a[2, 0] = a[3, 0] = -1.0  # NaN and infinity in dead units
        expected = (g.astype(np.float64) * np.where(a > 0, 1.0, 0.0)).astype(dtype)
        K.dact_mul(g, a, ACT["relu"], g[0, :0], g[0, :0])
        np.testing.assert_array_equal(g, expected)
        assert np.signbit(g).tolist() == np.signbit(expected).tolist()


@pytest.mark.parametrize(
    ("output", "loss"),
    [
        ("softmax", "cross_entropy"),
        ("sigmoid", "binary_cross_entropy"),
        ("identity", "mse"),
        ("relu", "mse"),
        ("tanh", "mse"),
        ("sigmoid", "mse"),
        ("softmax", "mse"),
    ],
)
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "dense"])
def test_output_delta_matches_reference(output, loss, labels, dtype, rng):
    B, n = 6, 5
    z = (2 * rng.standard_normal((B, n))).astype(dtype)
    if labels and loss != "binary_cross_entropy":
        y = rng.integers(0, n, B).astype(np.int64)
    elif loss == "binary_cross_entropy":
        y = (rng.random((B, n)) > 0.5).astype(dtype)
    else:
        y = rng.random((B, n)).astype(dtype)
    rdelta, rvalue = ref.output_delta(z.astype(np.float64), y, output, loss)
    be = NumbaBackend()
    delta, value = be.output_delta(z.copy(), y, output, loss)
    _close(delta, rdelta, dtype)
    assert rel_error(np.float64(value), np.float64(rvalue)) <= TOLERANCE[dtype]
    # in place, with db summed in the same pass
    db = np.empty(n, dtype=dtype)
    Ld, Y = be._split_targets(y, n, np.dtype(dtype))
    zz = z.copy()
    K.output_delta(zz, Y, Ld, ACT[output], K.LOSS_IDS[loss], zz, db, zz.shape[0])
    _close(zz, rdelta, dtype)
    _close(db, rdelta.sum(axis=0), dtype)


def _exp_loop():
    from numba import njit

    @njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = E.fast_exp(x[i])

    return exp_all


def test_float32_exp_is_within_an_ulp_over_the_whole_range():
    """``exp32`` (the float32 ``fast_exp``) against exp in float64, every 1e-4 over
    [-110, 90]: results within an ulp where normal, within the smallest subnormal below, 0 and
    inf and NaN exactly where float32 ``np.exp`` has them; float64 is libm's exp."""
    special = [np.inf, -np.inf, np.nan, 0.0, -0.0, 88.72, 88.73, -87.3, -103.9, -104.0, -1e30]
    x = np.concatenate([np.linspace(-110, 90, 2_000_001), special]).astype(np.float32)
    got = np.empty_like(x)
    _exp_loop()(x, got)
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        f32 = np.exp(x)
    normal = np.isfinite(f32) & (f32 >= np.finfo(np.float32).tiny)
    ulps = np.abs(got[normal] - exact[normal]) / np.spacing(f32[normal]).astype(np.float64)
    assert ulps.max() <= 1.0
    sub = (f32 > 0) & (f32 < np.finfo(np.float32).tiny)
    assert sub.any() and np.abs(got[sub] - exact[sub]).max() <= 2.0**-149
    rest = ~normal & ~sub
    np.testing.assert_array_equal(got[rest], f32[rest])  # 0, inf and NaN
    x64 = np.linspace(-800, 800, 10001)
    got64 = np.empty_like(x64)
    with np.errstate(over="ignore"):
        _exp_loop()(x64, got64)
        np.testing.assert_allclose(got64, np.exp(x64), rtol=3e-16)  # libm's exp


def test_float32_exp_loop_vectorises():
    """A loop over ``fast_exp`` compiles to vector instructions (no libm call per element)."""
    import re

    fn = _exp_loop()
    fn(np.zeros(4, np.float32), np.zeros(4, np.float32))
    llvm = fn.inspect_llvm(fn.signatures[0])
    assert re.search(r"<\d+ x float>", llvm), "the float32 exp loop was not vectorised"


def test_bce_loss_keeps_relative_accuracy_for_confident_predictions():
    """Per element ``(1-y) max(z,0) - y min(z,0) + log1p(e^-|z|)``: no cancellation."""
    z = np.array([[40.0, -40.0, 30.0, -30.0]])
    y = np.array([[1.0, 0.0, 1.0, 0.0]])
    exact = float(np.sum(np.log1p(np.exp(-np.abs(z)))))  # every term is log1p(e^-|z|)
    _, value = NumbaBackend().output_delta(z, y, "sigmoid", "binary_cross_entropy")
    assert value == pytest.approx(exact, rel=1e-12)


def test_label_out_of_range_is_an_error():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="label"):
        NumbaBackend().output_delta(z, np.array([0, 3]), "softmax", "cross_entropy")


@pytest.mark.parametrize("opt_name", ["sgd_wd", "nesterov", "adam_wd", "adamw"])
def test_update_kernels_match_reference(opt_name, dtype, rng):
    p = rng.standard_normal((4, 7)).astype(dtype)
    g = rng.standard_normal((4, 7)).astype(dtype)
    s1 = rng.random((4, 7)).astype(dtype)
    s2 = rng.random((4, 7)).astype(dtype)
    f = [p.astype(np.float64), g.astype(np.float64), s1.astype(np.float64), s2.astype(np.float64)]
    be = NumbaBackend()
    if opt_name.startswith("sgd") or opt_name == "nesterov":
        args = (0.1, 0.0, False, 0.01) if opt_name == "sgd_wd" else (0.1, 0.9, True, 0.01)
        rp, rbuf = ref.sgd_update(f[0], f[1], f[2] if args[1] else None, *args)
        be.sgd_update(p, g, s1 if args[1] else None, *args)
        if args[1]:
            _close(s1, rbuf, dtype)
    else:
        decoupled = opt_name == "adamw"
        args = (3, 1e-2, 0.9, 0.999, 1e-8, 0.01, decoupled)
        rp, rm, rv = ref.adam_update(f[0], f[1], f[2], f[3], *args)
        be.adam_update(p, g, s1, s2, *args)
        _close(s1, rm, dtype)
        _close(s2, rv, dtype)
    _close(p, rp, dtype)


# --- the folded SGD step ----------------------------------------------------------------------


def _problem(dtype, rng, sizes=(13, 33, 7, 5), batch=9, scale=1.0):
    W = [(rng.standard_normal((sizes[i + 1], sizes[i])) / 3).astype(dtype) for i in range(3)]
    b = [rng.standard_normal(sizes[i + 1]).astype(dtype) for i in range(3)]
    x = (scale * rng.standard_normal((batch, sizes[0]))).astype(dtype)
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    return W, b, x, y


def _step(be, step_fn, W, b, x, y, opt, activation="tanh"):
    W = [w.copy() for w in W]
    b = [v.copy() for v in b]
    state = opt.bind(None, be, [a.shape for a in W + b], W[0].dtype)
    value, _, _, _ = step_fn(W, b, x, y, activation, "softmax", "cross_entropy", opt, state)
    return float(value), W, b, state


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_folded_sgd_step_matches_reference(dtype, rng, wd):
    W, b, x, y = _problem(dtype, rng)
    be = NumbaBackend()
    opt = optim.SGD(lr=0.1, weight_decay=wd)
    value, W1, b1, state = _step(be, be.train_step, W, b, x, y, opt)
    f64 = [w.astype(np.float64) for w in W], [v.astype(np.float64) for v in b]
    rvalue, dWs, dbs = ref.gradients(
        *f64, x.astype(np.float64), y, "tanh", "softmax", "cross_entropy"
    )
    assert rel_error(np.float64(value), np.float64(rvalue)) <= TOLERANCE[dtype]
    assert state["step"] == 1
    for p, p0, g in zip(W1 + b1, f64[0] + f64[1], dWs + dbs):
        rp, _ = ref.sgd_update(p0, g, None, 0.1, 0.0, False, wd)
        _close(p - p0, rp - p0, dtype, factor=10)  # the change, not the (larger) weights


def test_fold_falls_back_when_the_bound_is_not_met(rng, monkeypatch):
    """With lr = 1e30 the bound ``lr B max|delta| max|a|`` fails: nothing is folded, and dW is
    computed and applied by the checked update, exactly as the unfolded path does (bit for
    bit). At a normal lr the checked update never runs: the one kernel call of the fold updated
    the weights inside the GEMM and the biases after it."""
    W, b, x, y = _problem("float32", rng)
    be = NumbaBackend()
    updated = []
    every = C.sgd_step

    def spy_all(ps, gs, bufs, *args):  # the checked update over every tensor at once
        status = every(ps, gs, bufs, *args)
        if status < 0:  # written
            updated.extend(p.size for p in ps)
        return status

    monkeypatch.setattr(C, "sgd_step", spy_all)
    got = _step(be, be.train_step, W, b, x, y, optim.SGD(lr=1e30))
    assert sorted(updated) == sorted(p.size for p in W + b)
    plain = _step(be, lambda *a: Backend.train_step(be, *a), W, b, x, y, optim.SGD(lr=1e30))
    for p, q in zip(got[1] + got[2], plain[1] + plain[2]):
        np.testing.assert_array_equal(p, q)
    updated.clear()
    folded = _step(be, be.train_step, W, b, x, y, optim.SGD(lr=1e-3))
    assert updated == []  # the fold was taken
    assert any((p != q).any() for p, q in zip(folded[1] + folded[2], W + b))
    unfolded = _step(be, lambda *a: Backend.train_step(be, *a), W, b, x, y, optim.SGD(lr=1e-3))
    assert updated  # (the spy sees the plain path)
    for p, q in zip(folded[1] + folded[2], unfolded[1] + unfolded[2]):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
@pytest.mark.parametrize("where", ["x-nan", "x-inf", "x-huge", "y-inf"])
@pytest.mark.parametrize(
    "opt", [optim.SGD(lr=0.1), optim.SGD(lr=0.1, momentum=0.9)], ids=["sgd", "momentum"]
)
def test_non_finite_step_changes_nothing(rng, where, opt, split):
    W, b, x, y = _problem("float32", rng)
    loss, output = "cross_entropy", "softmax"
    if where == "x-nan":
        x[3, 4] = np.nan
    elif where == "x-inf":
        x[0, 0] = np.inf
    elif where == "x-huge":
        x[:] = 3e38
    else:
        loss, output = "mse", "identity"
        y = rng.standard_normal((x.shape[0], 5)).astype(np.float32)
        y[1, 2] = np.inf
    be = _splitting(2) if split else NumbaBackend()
    opt.reset()
    state = opt.bind(None, be, [a.shape for a in W + b], np.float32)
    before = [a.copy() for a in W + b]
    with pytest.raises(gpubp.NonFiniteLossError):
        be.train_step(W, b, x, y, "relu", output, loss, opt, state)
    for p, q in zip(W + b, before):
        np.testing.assert_array_equal(p, q)
    assert state["step"] == 0


# --- a batch split over threads ---------------------------------------------------------------


def _splitting(threads, min_rows=2):
    """A backend that splits batches of ``2 min_rows`` rows or more over ``threads`` threads."""
    if not numba_blas.AVAILABLE or numba_blas.blas_threads() is None:
        pytest.skip("NumPy's BLAS is not callable from the kernels or its threads cannot be set")
    be = NumbaBackend(threads=threads)
    be.split_min_rows = min_rows
    return be


def test_split_needs_enough_rows_and_threads():
    if not numba_blas.AVAILABLE or numba_blas.blas_threads() is None:
        pytest.skip("NumPy's BLAS is not callable from the kernels or its threads cannot be set")
    rows = NumbaBackend.split_min_rows
    assert NumbaBackend(threads=2)._parts(2 * rows) == 2
    assert NumbaBackend(threads=2)._parts(2 * rows - 1) == 1
    assert NumbaBackend(threads=3)._parts(2 * rows) == 2  # every part keeps its rows
    assert NumbaBackend(threads=1)._parts(100 * rows) == 1  # one thread: serial


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(
    ("activation", "output", "loss"),
    [
        ("relu", "softmax", "cross_entropy"),
        ("tanh", "sigmoid", "binary_cross_entropy"),
        ("leaky_relu", "identity", "mse"),
        ("sigmoid", "softmax", "mse"),
    ],
)
def test_split_batch_matches_reference(dtype, seed, threads, activation, output, loss):
    """Forward, loss, every dW and db, and each optimizer's step, with the batch (11 rows)
    split in parts of 5 and 6 or 3, 4 and 4 rows."""
    be = _splitting(threads)
    assert be._parts(11) == threads
    result = check_configuration(be, dtype, (5, 33, 1, 3), 11, activation, output, loss, seed=seed)
    assert result.ok, result.errors
    assert be._pool is not None  # the split was taken


def test_split_batch_with_labels_matches_reference(dtype, rng):
    W, b, x, y = _problem(dtype, rng, batch=11, scale=3.0)
    be = _splitting(3)
    value, dWs, dbs = be.gradients(W, b, x, y, "relu", "softmax", "cross_entropy")
    f64 = [w.astype(np.float64) for w in W], [v.astype(np.float64) for v in b]
    rvalue, rdW, rdb = ref.gradients(
        *f64, x.astype(np.float64), y, "relu", "softmax", "cross_entropy"
    )
    assert rel_error(np.float64(value), np.float64(rvalue)) <= TOLERANCE[dtype]
    for got, expected in zip(dWs + dbs, rdW + rdb):
        _close(got, expected, dtype)
    assert be._pool is not None  # the other parts ran in the pool


def test_split_runs_blas_on_one_thread_and_restores_it(rng, monkeypatch):
    be = _splitting(2)
    before = numba_blas.blas_threads()
    seen = []
    orig = K.output_delta

    def spy(*args):
        seen.append(numba_blas.blas_threads())
        return orig(*args)

    monkeypatch.setattr(K, "output_delta", spy)
    W, b, x, y = _problem("float32", rng)
    _step(be, be.train_step, W, b, x, y, optim.SGD(lr=0.1))
    assert seen == [1, 1]  # two parts, each with BLAS at one thread
    assert numba_blas.blas_threads() == before
    y[7] = 99  # an error in one part: raised once all parts are done, BLAS still restored
    with pytest.raises(ValueError, match="label"):
        _step(be, be.train_step, W, b, x, y, optim.SGD(lr=0.1))
    assert numba_blas.blas_threads() == before


# --- threads and the no-BLAS path --------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_threads_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="threads"):
        NumbaBackend(threads=bad)


def test_threads_applies_during_calls_and_restores(rng):
    if numba_blas.blas_threads() is None:
        pytest.skip("NumPy's BLAS does not report its threads")
    before = numba_blas.blas_threads()
    W, b, x, y = _problem("float64", rng)
    one = NumbaBackend(threads=1)
    seen = []
    orig = layers.backprop_fold  # the whole folded SGD step, one kernel call

    def spy(*args):
        seen.append(numba_blas.blas_threads())
        return orig(*args)

    layers.backprop_fold = spy
    try:
        got = _step(one, one.train_step, W, b, x, y, optim.SGD(lr=0.1))
    finally:
        layers.backprop_fold = orig
    assert seen == [1]
    assert numba_blas.blas_threads() == before
    default = NumbaBackend()
    expected = _step(default, default.train_step, W, b, x, y, optim.SGD(lr=0.1))
    for p, q in zip(got[1], expected[1]):
        np.testing.assert_allclose(p, q, rtol=1e-12)


@pytest.mark.parametrize(
    ("activation", "output", "loss"),
    [
        ("relu", "softmax", "cross_entropy"),
        ("sigmoid", "sigmoid", "binary_cross_entropy"),
        ("leaky_relu", "tanh", "mse"),
    ],
)
def test_numpy_matmul_fallback_matches_reference(dtype, seed, activation, output, loss):
    be = NumbaBackend()
    be.blas_in_kernels = False  # as on a NumPy built without an ILP64 OpenBLAS
    result = check_configuration(be, dtype, (5, 33, 1, 3), 7, activation, output, loss, seed=seed)
    assert result.ok, result.errors


# --- allocations and the JIT cache -------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adamw"])
def test_steady_state_allocates_nothing(opt_name, split):
    """No growth in traced (NumPy/Python) memory, and nothing held in Numba's runtime.

    Numba's allocator is not traced by tracemalloc, so its own statistics are read: every
    block allocated during the steps has been freed. (Passing an array to a kernel wraps it in a
    small runtime record that is freed on return, so allocations are counted, not forbidden;
    the kernels themselves make no arrays: they only take views of their arguments.)"""
    from numba.core.runtime import _nrt_python as _nrt
    from numba.core.runtime import rtsys

    from .test_memory import OPTIMIZERS, measure

    be = _splitting(2, min_rows=64) if split else NumbaBackend()
    model = gpubp.MLP([64, 128, 128, 10], backend=be, dtype="float32", seed=0)
    W, b = (list(p) for p in model.get_parameters())
    W = [w.astype(np.float32) for w in W]
    b = [v.astype(np.float32) for v in b]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    y = rng.integers(0, 10, 256).astype(np.int64)
    opt = OPTIMIZERS[opt_name]()
    state = opt.bind(None, be, [a.shape for a in W + b], np.float32)

    def step():
        return be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)

    for _ in range(100):  # past the thread tuner's first probe, which plans its count once
        step()
    was_enabled = _nrt.memsys_stats_enabled()
    _nrt.memsys_enable_stats()
    try:
        stats = rtsys.get_allocation_stats()
        nrt_before = stats.alloc - stats.free
        growth, _, sites = measure(step, 100)
        stats = rtsys.get_allocation_stats()
        nrt_held = (stats.alloc - stats.free) - nrt_before
    finally:
        if not was_enabled:
            _nrt.memsys_disable_stats()
    assert growth < 2 * 1024, f"traced memory grew by {growth} bytes over 100 steps:\n{sites}"
    assert nrt_held == 0, f"{nrt_held} blocks of Numba's runtime are still held after 100 steps"


def test_kernels_are_cached_on_disk():
    kernels = [
        K.bias_act,
        K.absmax,
        K.dact_mul,
        K.colsum,
        K.output_delta,
        K.has_nonfinite,
        O.sgd_check,
        O.sgd_apply,
        O.adam_check,
        O.adam_apply,
        C.sgd_step,
        C.adam_step,
        C.sgd_step_par,
        C.adam_step_par,
        C.sgd_proved,
        C.adam_proved,
        layers.forward_layer,
        layers.hidden_delta,
        layers.weight_gradient,
        layers.backprop,
        layers.matmul,
    ]
    for k in kernels:
        assert type(k._cache).__name__ != "NullCache", k


def test_second_process_loads_kernels_from_the_cache(tmp_path):
    """A fresh process compiles (and caches); the next one only loads: no new compilation."""
    code = (
        "import numpy as np, gpubp\n"
        "from gpubp.backends.numba import layers\n"
        "m = gpubp.MLP([5, 7, 3], backend='numba', dtype='float32', seed=0)\n"
        "m.train_step(np.ones((4, 5)), np.array([0, 1, 2, 0]), gpubp.optim.SGD(lr=0.1))\n"
        "k = layers.backprop_fold  # the whole SGD step, one kernel\n"
        "print(sum(k.stats.cache_misses.values()), sum(k.stats.cache_hits.values()))\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert runs[0] == ["1", "0"]  # compiled (and written to the cache)
    assert runs[1] == ["0", "1"]  # loaded


@pytest.mark.parametrize("batch", [512, 4000])
def test_sgd_step_is_accurate_at_large_batches(batch):
    """Folding SGD into the gradient GEMM rounds the update once per BLAS block of rows; above
    FOLD_MAX_BATCH the step computes dW instead, and stays within the float32 tolerance."""
    from gpubp.check import TOLERANCE, check_configuration

    sizes = (64, 64, 64, 64, 64, 64, 16)  # narrow-deep: many rows per weight
    r = check_configuration(
        "numba", "float32", sizes, batch, "relu", "softmax", "cross_entropy", seed=1,
        optimizers=("sgd",),
    )  # fmt: skip
    assert r.errors["step:sgd"] <= TOLERANCE["float32"], r.errors
