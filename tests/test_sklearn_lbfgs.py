"""gpubp.sklearn's solver='lbfgs' against scikit-learn's: the same numbers and behaviour.

L-BFGS amplifies rounding differences over many iterations (its curvature pairs are
differences of nearby gradients), so the float64 comparisons to 1e-8 run a few tens of
iterations, as far as two BLAS libraries stay that close.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")

from sklearn import neural_network as sk
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import LabelBinarizer

from gpubp.backends import available_backends
from gpubp.sklearn import MLPClassifier, MLPRegressor

from .test_sklearn import SK_VERSION, _data

BACKENDS = [b for b in ("numpy", "numba", "cupy") if b in available_backends()]


def _fit_both(kind: str, backend: str, X, y, fit_params=None, **params):
    cls_sk, cls_ours = (
        (sk.MLPRegressor, MLPRegressor)
        if kind in ("single", "multi")
        else (sk.MLPClassifier, MLPClassifier)
    )
    common = dict(hidden_layer_sizes=(9, 5), random_state=3, solver="lbfgs", max_iter=25)
    common.update(params)
    fitted, caught = [], []
    for est in (cls_sk(**common), cls_ours(backend=backend, **common)):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always", ConvergenceWarning)
            fitted.append(est.fit(X, y, **(fit_params or {})))
        caught.append([str(w.message) for w in got if w.category is ConvergenceWarning])
    return fitted[0], fitted[1], caught[0], caught[1]


def _assert_same(theirs, ours, rtol=1e-8):
    for a, b in zip(theirs.coefs_ + theirs.intercepts_, ours.coefs_ + ours.intercepts_):
        assert b.shape == a.shape and b.dtype == a.dtype
        assert np.abs(a - b).max() <= rtol * np.abs(a).max()
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=rtol)
    assert ours.n_iter_ == theirs.n_iter_
    assert ours.out_activation_ == theirs.out_activation_
    for name in ("loss_curve_", "t_", "best_loss_", "validation_scores_"):
        assert hasattr(ours, name) == hasattr(theirs, name), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "single", "multi"])
def test_same_lbfgs_fit_as_sklearn(backend, kind):
    X, y = _data(kind, seed=11)
    activation = {"binary": "tanh", "multiclass": "relu", "multilabel": "logistic"}
    theirs, ours, w_theirs, w_ours = _fit_both(
        kind, backend, X, y, alpha=0.01, activation=activation.get(kind, "relu")
    )
    _assert_same(theirs, ours)
    assert w_ours == w_theirs and len(w_ours) == 1  # max_iter reached: its warning, word for word


@pytest.mark.parametrize("backend", BACKENDS)
def test_lbfgs_max_fun_tol_and_sample_weight(backend):
    X, y = _data("multiclass", seed=12)
    # max_fun stops it first (scipy counts evaluations, line searches included)
    theirs, ours, w_theirs, w_ours = _fit_both("multiclass", backend, X, y, max_fun=9)
    _assert_same(theirs, ours)
    assert w_ours == w_theirs and theirs.n_iter_ < 25
    # a tol large enough to converge (no warning)
    theirs, ours, w_theirs, w_ours = _fit_both("single", backend, *_data("single"), tol=0.1)
    _assert_same(theirs, ours)
    assert w_ours == w_theirs == [] and theirs.n_iter_ < 25
    if SK_VERSION >= (1, 7):
        sw = np.random.default_rng(12).uniform(0.0, 2.0, X.shape[0])
        theirs, ours, _, _ = _fit_both("multiclass", backend, X, y, {"sample_weight": sw})
        _assert_same(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_lbfgs_warm_start_and_partial_fit_as_sklearn(backend):
    X, y = _data("single", seed=13)
    theirs, ours, _, _ = _fit_both("single", backend, X, y, warm_start=True, max_iter=8)
    for est in (theirs, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(X, y)
            est.partial_fit(X, y)  # the regressor keeps partial_fit: one more L-BFGS fit
    _assert_same(theirs, ours)
    # the classifier hides it, as scikit-learn's does
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    assert hasattr(MLPClassifier(solver="adam"), "partial_fit")
    with pytest.raises(AttributeError, match="partial_fit"):
        _ = MLPClassifier(solver="lbfgs").partial_fit


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_lbfgs_loss_is_sklearns_on_saturated_outputs(backend):
    """scikit-learn clips probabilities to [eps, 1 - eps] in the loss its line search sees;
    the loss and gradient at large weights (saturated softmax) are its."""
    X, y = _data("multiclass", seed=14)
    theirs, ours, _, _ = _fit_both("multiclass", backend, X, y, max_iter=1)
    theta = 40 * np.hstack([c.ravel() for c in theirs.coefs_ + theirs.intercepts_])
    Y = LabelBinarizer().fit_transform(y)
    work = ([X] + [None] * 3, [None] * 3, [None] * 3, [None] * 3)
    want_loss, want_grad = theirs._loss_grad_lbfgs(theta, X, Y, None, *work)
    loss, grad = ours._loss_grad_lbfgs(theta, X, Y, None)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12 * np.abs(want_grad).max())


def test_lbfgs_on_float32_input_ends_in_float64_as_sklearn():
    """scipy evaluates a float32 start in float32 and answers in float64: scikit-learn's
    L-BFGS on float32 input returns float64 weights (equal to float32 rounding here)."""
    X, y = _data("multiclass", seed=15)
    theirs, ours, _, _ = _fit_both("multiclass", "numpy", X.astype(np.float32), y, max_iter=5)
    _assert_same(theirs, ours, rtol=1e-5)
    assert ours.predict_proba(X.astype(np.float32)).dtype == np.float64
