"""The Poisson loss (exp output, half the Poisson deviance): reference, backends, estimator.

``C = 1/B sum [Y log(Y / a) - Y + a]`` with ``a = exp(z)`` and ``0 log 0 = 0``;
``delta = (a - Y) / B`` (scikit-learn's ``MLPRegressor(loss='poisson')``).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from gpubp import reference as ref
from gpubp.backends import available_backends, get_backend

BACKENDS = [b for b in ("numpy", "numba", "cupy") if b in available_backends()]


def _counts(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    y = rng.poisson(1.5, shape).astype(np.float64)
    y.flat[::3] = 0.0  # zeros: 0 log 0 = 0
    return y


def test_reference_is_sklearns_half_deviance_and_its_gradient(rng):
    z = rng.normal(0.0, 1.5, (13, 3))
    Y = _counts(rng, (13, 3))
    delta, value = ref.output_delta(z, Y, "exp", "poisson")
    a = np.exp(z)
    with np.errstate(divide="ignore", invalid="ignore"):
        ylogy = np.where(Y > 0, Y * np.log(Y / a), 0.0)
    assert value == pytest.approx(np.sum(ylogy - Y + a) / 13, rel=1e-13)
    np.testing.assert_allclose(delta, (a - Y) / 13, rtol=1e-14)
    # central finite differences of C
    eps, numeric = 1e-6, np.empty_like(z)
    for idx in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += eps
        zm[idx] -= eps
        numeric[idx] = (
            ref.output_delta(zp, Y, "exp", "poisson")[1]
            - ref.output_delta(zm, Y, "exp", "poisson")[1]
        ) / (2 * eps)
    np.testing.assert_allclose(numeric, delta, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="poisson"):
        ref.output_delta(z, Y, "identity", "poisson")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_out", [1, 3])
def test_backends_output_delta_gradients_and_forward(backend, dtype, n_out, rng):
    be, tol = get_backend(backend), (1e-12 if dtype == "float64" else 2e-5)
    sizes, B = [5, 7, n_out], 13
    Ws = [rng.normal(0, 0.5, (o, i)) for i, o in itertools.pairwise(sizes)]
    bs = [rng.normal(0, 0.1, o) for o in sizes[1:]]
    x, Y = rng.normal(size=(B, 5)), _counts(rng, (B, n_out))
    z = rng.normal(0.0, 1.5, (B, n_out))

    def dev(a):
        return be.asarray(np.ascontiguousarray(a, dtype=dtype))

    want_delta, want_value = ref.output_delta(z, Y, "exp", "poisson")
    delta, value = be.output_delta(dev(z), dev(Y), "exp", "poisson")
    assert float(value) == pytest.approx(want_value, rel=tol)
    np.testing.assert_allclose(be.to_numpy(delta), want_delta, rtol=tol, atol=tol / B)
    # the whole network: forward, the fused backward and the exp output for prediction
    acts = [x, ref.forward_layer(x, Ws[0], bs[0], "tanh")]
    zo = acts[1] @ Ws[1].T + bs[1]
    d, want_value = ref.output_delta(zo, Y, "exp", "poisson")
    want = list(ref.parameter_gradients(d, acts[1]))
    d0 = ref.hidden_delta(d, Ws[1], acts[1], "tanh")
    want = [*ref.parameter_gradients(d0, x), *want]
    W, b = [dev(w) for w in Ws], [dev(c) for c in bs]
    value, dWs, dbs = be.gradients(W, b, dev(x), dev(Y), "tanh", "exp", "poisson")
    assert float(value) == pytest.approx(want_value, rel=tol)
    for got, exp in zip([dWs[0], dbs[0], dWs[1], dbs[1]], want, strict=True):
        np.testing.assert_allclose(be.to_numpy(got), exp, rtol=tol, atol=tol * np.abs(exp).max())
    out = be.to_numpy(be.forward(W, b, dev(x), "tanh", "exp"))
    np.testing.assert_allclose(out, np.exp(zo), rtol=10 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_estimator_same_numbers_as_sklearn(backend):
    pytest.importorskip("sklearn", minversion="1.7")  # scikit-learn's loss='poisson' is 1.7's
    from sklearn.neural_network import MLPRegressor as Theirs

    from gpubp.sklearn import MLPRegressor

    rng = np.random.default_rng(7)
    X = rng.normal(size=(57, 7))
    y = rng.poisson(np.exp(0.5 * X[:, 0] - 0.3 * X[:, 1])).astype(np.float64)
    Y2 = np.stack([y, rng.poisson(2.0, 57)], axis=1).astype(np.float64)
    sw = rng.uniform(0.0, 2.0, 57)
    solvers = [
        dict(solver="adam", max_iter=5, batch_size=10, learning_rate_init=0.01),
        dict(solver="sgd", max_iter=5, batch_size=10, learning_rate_init=0.01),
        dict(solver="lbfgs", max_iter=20),
    ]
    if backend == "cupy":  # the emulated GPU is slow: one case of each solver
        cases = [(s, t, f) for s, (t, f) in zip(solvers, [(y, {}), (Y2, {"sample_weight": sw}),
                                                          (Y2, {})])]  # fmt: skip
    else:
        cases = [(s, t, f) for s in solvers for t in (y, Y2) for f in ({}, {"sample_weight": sw})]
    for params, target, fit_params in cases:
        params = dict(loss="poisson", hidden_layer_sizes=(9, 5), random_state=3, alpha=0.01,
                      **params)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = Theirs(**params).fit(X, target, **fit_params)
            ours = MLPRegressor(backend=backend, **params).fit(X, target, **fit_params)
        assert ours.out_activation_ == theirs.out_activation_ == "exp"
        assert ours.n_iter_ == theirs.n_iter_
        for a, b in zip(theirs.coefs_ + theirs.intercepts_, ours.coefs_ + ours.intercepts_):
            assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max()
        if params["solver"] == "lbfgs":
            assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-8)
        else:
            np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-8)
        np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-8)


def test_estimator_refuses_negative_targets_and_changes_nothing():
    pytest.importorskip("sklearn", minversion="1.6")
    from gpubp.sklearn import MLPRegressor

    X = np.random.default_rng(0).normal(size=(20, 3))
    est = MLPRegressor(loss="poisson", hidden_layer_sizes=(4,), max_iter=2, backend="numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, np.arange(20.0))
    before = [c.copy() for c in est.coefs_]
    with pytest.raises(ValueError, match=r"y >= 0"):
        est.partial_fit(X, np.arange(20.0) - 3)
    for a, b in zip(before, est.coefs_, strict=True):
        np.testing.assert_array_equal(a, b)
