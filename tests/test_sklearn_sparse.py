"""Sparse X in gpubp.sklearn: the same numbers as scikit-learn, the matrix never densified."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")

import scipy.sparse as sp
from sklearn import neural_network as sk

from gpubp.backends import available_backends
from gpubp.sklearn import MLPClassifier, MLPRegressor

#: cupy runs on the emulated GPU where there is none (tests/conftest.py): gpubp's CSR kernel
BACKENDS = [b for b in ("numpy", "numba", "cupy") if b in available_backends()]
CPU_BACKENDS = [b for b in BACKENDS if b != "cupy"]
FORMATS = ["csr_matrix", "csr_array", "csc_matrix", "csc_array", "coo_matrix", "coo_array"]
SOLVERS = [
    dict(solver="adam"),
    dict(solver="sgd", shuffle=False),
    dict(solver="lbfgs", max_iter=15),
    dict(solver="adam", early_stopping=True, validation_fraction=0.2),
]


N_FEATURES = 41


def _data(seed: int = 0):
    """83 rows (batches of 10 leave 3), 41 columns at 10% density."""
    rng = np.random.default_rng(seed)
    X = sp.random(83, N_FEATURES, density=0.1, random_state=seed, format="csr")
    labels = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, 83)]
    target = X @ rng.normal(size=N_FEATURES) + 0.1 * rng.normal(size=83)
    return X, labels, target


@pytest.fixture
def never_densified(monkeypatch):
    """A toarray / todense of X (or of rows of it: N_FEATURES columns) fails the test
    (scikit-learn densifies its own small sparse label matrices)."""

    def guard(original):
        def refuse(self, *args, **kwargs):
            if self.shape[1] == N_FEATURES:
                raise AssertionError("the sparse X was densified")
            return original(self, *args, **kwargs)

        return refuse

    for name in FORMATS:
        cls = getattr(sp, name)
        for method in ("toarray", "todense"):
            monkeypatch.setattr(cls, method, guard(getattr(cls, method)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=["adam", "sgd", "lbfgs", "early_stopping"])
def test_same_numbers_as_sklearn_on_sparse_input(backend, solver, never_densified):
    X, labels, target = _data(1)
    for i, (theirs_cls, ours_cls, y) in enumerate(
        [(sk.MLPClassifier, MLPClassifier, labels), (sk.MLPRegressor, MLPRegressor, target)]
    ):
        Xf = getattr(sp, FORMATS[(i + len(solver)) % len(FORMATS)])(X)
        params = dict(hidden_layer_sizes=(9, 5), random_state=3, max_iter=6, batch_size=10,
                      alpha=0.01)  # fmt: skip
        params.update(solver)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = theirs_cls(**params).fit(Xf, y)
            ours = ours_cls(backend=backend, **params).fit(Xf, y)
        for a, b in zip(theirs.coefs_ + theirs.intercepts_, ours.coefs_ + ours.intercepts_):
            assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max()
        assert ours.n_iter_ == theirs.n_iter_
        assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-8)
        if hasattr(theirs, "loss_curve_"):
            np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-8)
        if i == 0:
            np.testing.assert_allclose(ours.predict_proba(Xf), theirs.predict_proba(Xf), rtol=1e-7)
        else:
            np.testing.assert_allclose(ours.predict(Xf), theirs.predict(Xf), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_sparse_format_gives_the_dense_fit(fmt, never_densified):
    X, labels, _ = _data(2)
    coo = X.tocoo()
    dense = np.zeros(X.shape)
    dense[coo.row, coo.col] = coo.data
    params = dict(hidden_layer_sizes=(6,), random_state=0, max_iter=3, batch_size=16)
    fits = []
    for X_in in (getattr(sp, fmt)(X), dense):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = MLPClassifier(backend=CPU_BACKENDS[-1], **params)
            est.fit(X_in, labels).partial_fit(X_in, labels)
        fits.append((est.coefs_ + est.intercepts_, est.predict_proba(X_in)))
    for a, b in zip(fits[0][0] + [fits[0][1]], fits[1][0] + [fits[1][1]], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(
    tuple(int(p) for p in __import__("sklearn").__version__.split(".")[:2]) < (1, 7),
    reason="scikit-learn's MLP takes sample_weight from 1.7 on",
)
@pytest.mark.parametrize("hidden", [(7,), ()], ids=["hidden", "no-hidden"])
def test_sparse_with_sample_weight_as_sklearn(hidden, never_densified):
    """The weighted path, and a network whose first layer is its output layer."""
    X, labels, _ = _data(3)
    sw = np.random.default_rng(3).uniform(0.0, 2.0, X.shape[0])
    for solver in ("sgd", "lbfgs"):
        params = dict(hidden_layer_sizes=hidden, random_state=0, max_iter=5, batch_size=10,
                      solver=solver)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = sk.MLPClassifier(**params).fit(X, labels, sample_weight=sw)
            ours = MLPClassifier(backend=BACKENDS[-1], **params).fit(X, labels, sample_weight=sw)
        for a, b in zip(theirs.coefs_ + theirs.intercepts_, ours.coefs_ + ours.intercepts_):
            assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_sparse_poisson_as_sklearn(backend, solver, never_densified):
    """loss='poisson' (exp output, half the Poisson deviance) on sparse X: coefficients, loss
    curve and n_iter_ to 1e-8 in float64."""
    X, _, target = _data(4)
    y = np.random.default_rng(4).poisson(np.exp(np.clip(0.5 * target, -2.0, 2.0)))
    params = dict(hidden_layer_sizes=(6,), random_state=2, max_iter=8, batch_size=10,
                  solver=solver, loss="poisson", alpha=0.001)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sk.MLPRegressor(**params).fit(X, y)
        ours = MLPRegressor(backend=backend, **params).fit(X, y)
    for a, b in zip(theirs.coefs_ + theirs.intercepts_, ours.coefs_ + ours.intercepts_):
        assert np.abs(a - b).max() <= 1e-8 * np.abs(a).max()
    assert ours.n_iter_ == theirs.n_iter_
    if solver != "lbfgs":
        np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=1e-8)
    np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_float32_fit_agrees_with_the_dense_one(backend, never_densified):
    """A float32 model (dtype=np.float32): sparse X against the same data dense, widths that
    are not multiples of 32 and batches of one row."""
    X, labels, _ = _data(5)
    dense = np.zeros(X.shape, dtype=np.float32)
    coo = X.tocoo()
    dense[coo.row, coo.col] = coo.data
    params = dict(hidden_layer_sizes=(33,), random_state=0, max_iter=2, batch_size=1,
                  dtype=np.float32)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = MLPClassifier(backend=backend, **params).fit(X.astype(np.float32), labels)
        b = MLPClassifier(backend=backend, **params).fit(dense, labels)
    assert a.coefs_[0].dtype == np.float32
    for p, q in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        assert np.abs(p - q).max() <= 1e-4 * np.abs(q).max()
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-4)
