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

BACKENDS = [b for b in ("numpy", "numba") if b in available_backends()]
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
            est = MLPClassifier(backend="numba" if "numba" in BACKENDS else "numpy", **params)
            est.fit(X_in, labels).partial_fit(X_in, labels)
        fits.append((est.coefs_ + est.intercepts_, est.predict_proba(X_in)))
    for a, b in zip(fits[0][0] + [fits[0][1]], fits[1][0] + [fits[1][1]], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_sparse_on_the_cupy_backend_is_refused_clearly():
    if "cupy" not in available_backends():
        pytest.skip("the cupy backend cannot run here")
    X, labels, _ = _data()
    with pytest.raises(ValueError, match="sparse X is supported on the numpy and numba"):
        MLPClassifier(backend="cupy", max_iter=1).fit(X, labels)


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
