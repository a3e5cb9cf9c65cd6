"""Sparse X in gpubp.MLP's fit, predict, evaluate and gradients: the numbers of the same data
given dense, and of the float64 reference, on every backend (cupy on the emulated GPU where
there is none); the matrix is never densified; bad sparse input is refused naming the argument.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import gpubp
from gpubp import reference as ref
from gpubp.preprocessing import Preprocessing

from .conftest import skip_unless_available

BACKENDS = ["numpy", "numba", "cupy"]
FORMATS = ["csr_matrix", "csr_array", "csc_matrix", "csc_array", "coo_matrix", "coo_array"]
N_FEATURES = 37  # not a multiple of 32; no other matrix in these tests has this many columns
TOL = {"float32": 2e-5, "float64": 1e-12}


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    skip_unless_available(request.param)
    return request.param


@pytest.fixture
def never_densified(monkeypatch):
    """A toarray / todense of a matrix of N_FEATURES columns fails the test (the tests build
    their dense copies before this is in force)."""

    def guard(original):
        def refuse(self, *args, **kwargs):
            if self.shape[-1] == N_FEATURES:
                raise AssertionError("the sparse X was densified")
            return original(self, *args, **kwargs)

        return refuse

    for name in FORMATS:
        cls = getattr(sp, name)
        for method in ("toarray", "todense"):
            monkeypatch.setattr(cls, method, guard(getattr(cls, method)))


def _data(rows: int = 45, seed: int = 0):
    """``(X csr, X dense, labels)``: 15% density, rows 0 and ``rows // 2`` empty."""
    X = sp.csr_array(sp.random(rows, N_FEATURES, density=0.15, random_state=seed, format="csr"))
    for r in (0, rows // 2):
        X.data[X.indptr[r] : X.indptr[r + 1]] = 0.0
    X.eliminate_zeros()
    coo = X.tocoo()
    dense = np.zeros(X.shape)
    dense[coo.row, coo.col] = coo.data  # (not toarray: never_densified may be in force)
    labels = np.random.default_rng(seed).integers(0, 3, rows)
    return X, dense, labels


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _model(backend, dtype, sizes=(N_FEATURES, 33, 3), **kw):
    return gpubp.MLP(list(sizes), backend=backend, dtype=dtype, seed=1, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fit_predict_evaluate_as_dense(backend_name, dtype, fmt):
    """Every format, with a preprocessing that shifts (folded into the first layer) and with
    validation data: the history, parameters, predictions and evaluation of the dense run."""
    X, dense, y = _data()
    pre = Preprocessing(
        shift=np.linspace(-1.0, 1.0, N_FEATURES), scale=np.linspace(0.5, 2, N_FEATURES)
    )
    runs = []
    for Xin in (getattr(sp, fmt)(X), dense):
        m = _model(backend_name, dtype, preprocessing=pre)
        hist = m.fit(Xin, y, epochs=2, batch_size=8, progress=False, validation_data=(Xin, y))
        runs.append((hist, m.get_parameters(), m.predict(Xin), m.evaluate(Xin, y), m.forward(Xin)))
    (h1, p1, pred1, ev1, out1), (h2, p2, pred2, ev2, out2) = runs
    tol = TOL[dtype] * 10
    for key in ("loss", "val_loss", "val_accuracy"):
        assert _rel(h1[key], h2[key]) <= tol, key
    for a, b in zip(p1[0] + p1[1], p2[0] + p2[1], strict=True):
        assert _rel(a, b) <= tol
    assert _rel(out1, out2) <= tol
    assert np.array_equal(pred1, pred2)
    assert ev1["accuracy"] == ev2["accuracy"]
    assert ev1["loss"] == pytest.approx(ev2["loss"], rel=tol)


def test_gradients_match_the_float64_reference(backend_name, dtype, never_densified):
    """One hidden layer and none; the first layer's gradient from the sparse products."""
    X, dense, y = _data(rows=11, seed=3)
    for sizes, act, out, loss in (
        ((N_FEATURES, 47, 5, 3), "tanh", "softmax", "cross_entropy"),
        ((N_FEATURES, 1), "relu", "identity", "mse"),
    ):
        m = _model(backend_name, dtype, sizes, activation=act, output=out, loss=loss)
        target = y if loss == "cross_entropy" else dense @ np.linspace(0, 1, N_FEATURES)
        value, dWs, dbs = m.gradients(X, target)
        W, b = m.get_parameters()
        W64, b64 = [w.astype(np.float64) for w in W], [v.astype(np.float64) for v in b]
        r_value, r_dWs, r_dbs = ref.gradients(W64, b64, dense, target, act, out, loss)
        assert value == pytest.approx(r_value, rel=TOL[dtype] * 10)
        for a, b_ in zip(dWs + dbs, r_dWs + r_dbs, strict=True):
            assert _rel(a, b_) <= TOL[dtype] * 10


def test_batch_of_one_and_duplicate_coo_entries(backend_name, dtype, never_densified):
    """batch_size=1 (every batch one row, some of them empty); a COO input whose duplicates
    add up as its dense form does; train_step on sparse rows."""
    rng = np.random.default_rng(5)
    rows_, cols = rng.integers(0, 9, 60), rng.integers(0, N_FEATURES, 60)
    vals = rng.normal(size=60)
    coo = sp.coo_array((vals, (rows_, cols)), shape=(9, N_FEATURES))  # duplicates kept
    dense = np.zeros((9, N_FEATURES))
    np.add.at(dense, (rows_, cols), vals)
    y = rng.integers(0, 3, 9)
    results = []
    for Xin in (coo, dense):
        m = _model(backend_name, dtype)
        hist = m.fit(Xin, y, epochs=2, batch_size=1, progress=False)
        step = m.train_step(Xin, y, gpubp.optim.SGD(lr=0.05))
        results.append((hist["loss"], step, m.get_parameters()[0], m.evaluate(Xin, y)["loss"]))
    (l1, s1, w1, e1), (l2, s2, w2, e2) = results
    assert _rel(l1, l2) <= TOL[dtype] * 10
    assert s1 == pytest.approx(s2, rel=TOL[dtype] * 10)
    for a, b in zip(w1, w2, strict=True):
        assert _rel(a, b) <= TOL[dtype] * 10
    assert e1 == pytest.approx(e2, rel=TOL[dtype] * 10)


def test_fit_never_densifies(backend_name, never_densified):
    X, _, y = _data(seed=6)
    m = _model(backend_name, "float64")
    m.fit(X, y, epochs=1, batch_size=16, progress=False, validation_data=(X.tocsc(), y))
    m.predict(X.tocoo())
    m.evaluate(X, y)


def test_bad_sparse_input_is_refused_naming_the_argument():
    X, _, y = _data(rows=6)
    m = _model("numpy", "float32")
    bad = X.copy()
    bad.data[2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or infinity"):
        m.fit(bad, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"x contains NaN or infinity"):
        m.predict(bad)
    with pytest.raises(ValueError, match=r"validation_data\[0\] contains NaN"):
        m.fit(X, y, epochs=1, progress=False, validation_data=(bad, y))
    huge = X * 1e300  # finite in float64, infinite in the model's float32
    with pytest.raises(ValueError, match="beyond the range of float32"):
        m.evaluate(huge, y)
    wide = sp.csr_array((6, N_FEATURES + 1))
    with pytest.raises(ValueError, match=rf"x is a sparse matrix of shape \(6, {N_FEATURES + 1}\)"):
        m.predict(wide)
    with pytest.raises(ValueError, match="x is an empty batch"):
        m.predict(sp.csr_array((0, N_FEATURES)))
    with pytest.raises(TypeError, match="X is a sparse matrix of dtype complex128; expected real"):
        m.fit(X.astype(np.complex128), y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="y has shape"):
        m.fit(X, y[:-1], epochs=1, progress=False)
    before = m.get_parameters()[0][0].copy()
    with pytest.raises(ValueError):
        m.fit(bad, y, epochs=1, progress=False)
    assert np.array_equal(m.get_parameters()[0][0], before)  # nothing trained
