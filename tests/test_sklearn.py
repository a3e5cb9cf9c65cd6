"""gpubp.sklearn against scikit-learn itself: the same numbers, the same behaviour."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("sklearn", minversion="1.6")

import sklearn
from sklearn import neural_network as sk
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from gpubp.backends import available_backends
from gpubp.sklearn import MLPClassifier, MLPRegressor

BACKENDS = [b for b in ("numpy", "numba") if b in available_backends()]
SK_VERSION = tuple(int(p) for p in sklearn.__version__.split(".")[:2])
needs_sk_sample_weight = pytest.mark.skipif(
    SK_VERSION < (1, 7), reason="scikit-learn's MLP takes sample_weight from 1.7 on"
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def _data(kind: str, seed: int = 0, n: int = 57, d: int = 7, scale: float = 1.0):
    """Awkward shapes: 57 rows (batches of 10 leave 7), 7 features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * scale
    if kind == "binary":
        y = np.where(X[:, 0] + rng.normal(size=n) > 0, "yes", "no")
    elif kind == "multiclass":
        y = np.array(["a", "b", "c", "d"])[rng.integers(0, 4, n)]
    elif kind == "multilabel":
        y = (rng.random((n, 3)) < 0.4).astype(int)
    elif kind == "single":
        y = X[:, 0] - 2 * X[:, 1] + rng.normal(size=n)
    else:  # multi-output regression
        y = np.stack([X[:, 0], X[:, 1] * X[:, 2], rng.normal(size=n)], axis=1)
    return X, y


def _pair(kind: str, backend: str, **params):
    cls_sk, cls_ours = (
        (sk.MLPRegressor, MLPRegressor)
        if kind in ("single", "multi")
        else (sk.MLPClassifier, MLPClassifier)
    )
    common = dict(hidden_layer_sizes=(9, 5), random_state=3, max_iter=6, batch_size=10)
    common.update(params)
    return cls_sk(**common), cls_ours(backend=backend, **common)


def _assert_same(theirs, ours, rtol=1e-8):
    for name in ("coefs_", "intercepts_"):
        for a, b in zip(getattr(theirs, name), getattr(ours, name)):
            assert b.shape == a.shape and b.dtype == a.dtype
            scale = np.abs(a).max()
            assert np.abs(a - b).max() <= rtol * scale, name
    np.testing.assert_allclose(ours.loss_curve_, theirs.loss_curve_, rtol=rtol)
    assert ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    assert ours.n_layers_ == theirs.n_layers_ and ours.n_outputs_ == theirs.n_outputs_
    assert ours.out_activation_ == theirs.out_activation_
    if theirs.best_loss_ is None:
        assert ours.best_loss_ is None
    else:
        np.testing.assert_allclose(ours.best_loss_, theirs.best_loss_, rtol=rtol)
    if theirs.validation_scores_ is not None:
        np.testing.assert_allclose(ours.validation_scores_, theirs.validation_scores_, rtol=rtol)


SOLVERS = [
    dict(solver="adam", learning_rate_init=0.01),
    dict(solver="sgd", momentum=0.0, learning_rate_init=0.1),
    dict(solver="sgd", momentum=0.9, nesterovs_momentum=False, learning_rate_init=0.05),
    dict(solver="sgd", momentum=0.9, nesterovs_momentum=True, learning_rate_init=0.05),
]
SCHEDULES = [
    dict(learning_rate="constant"),
    dict(learning_rate="invscaling", power_t=0.3),
    # tol so large that every epoch stalls: the rate is divided by 5 again and again
    dict(learning_rate="adaptive", tol=10.0, n_iter_no_change=1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["learning_rate"])
@pytest.mark.parametrize("solver", SOLVERS, ids=["adam", "sgd", "momentum", "nesterov"])
def test_same_coefficients_as_sklearn_for_every_solver_and_schedule(backend, solver, schedule):
    X, y = _data("multiclass")
    theirs, ours = _pair("multiclass", backend, alpha=0.01, **solver, **schedule)
    theirs.fit(X, y)
    ours.fit(X, y)
    _assert_same(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "single", "multi"])
@pytest.mark.parametrize("activation", ["relu", "logistic", "tanh", "identity"])
def test_same_coefficients_for_every_target_kind_and_activation(backend, kind, activation):
    X, y = _data(kind, seed=1)
    theirs, ours = _pair(kind, backend, activation=activation, alpha=0.003, solver="adam")
    theirs.fit(X, y)
    ours.fit(X, y)
    _assert_same(theirs, ours)
    if kind in ("binary", "multiclass", "multilabel"):
        np.testing.assert_array_equal(ours.classes_, theirs.classes_)
        np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-7)
        np.testing.assert_allclose(
            ours.predict_log_proba(X), theirs.predict_log_proba(X), rtol=1e-7, atol=1e-12
        )
        np.testing.assert_array_equal(ours.predict(X), theirs.predict(X))
    else:
        np.testing.assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-7, atol=1e-10)
    assert ours.score(X, y) == pytest.approx(theirs.score(X, y), rel=1e-7)


@needs_sk_sample_weight
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "multi"])
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_same_coefficients_with_sample_weight(backend, kind, solver):
    X, y = _data(kind, seed=2)
    sw = np.random.default_rng(5).uniform(0.0, 3.0, X.shape[0])
    sw[::7] = 0.0  # zero weights inside batches
    theirs, ours = _pair(kind, backend, solver=solver, alpha=0.02, learning_rate_init=0.02)
    theirs.fit(X, y, sample_weight=sw)
    ours.fit(X, y, sample_weight=sw)
    _assert_same(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["multiclass", "single"])
def test_same_early_stopping_and_no_shuffle(backend, kind):
    X, y = _data(kind, seed=3, n=83)
    if kind == "multiclass":  # scikit-learn < 1.8 cannot early-stop on string labels
        y = np.unique(y, return_inverse=True)[1]
    params = dict(early_stopping=True, validation_fraction=0.2, n_iter_no_change=2, max_iter=30)
    theirs, ours = _pair(kind, backend, **params)
    theirs.fit(X, y)
    ours.fit(X, y)
    _assert_same(theirs, ours)
    np.testing.assert_allclose(ours.best_validation_score_, theirs.best_validation_score_)
    theirs, ours = _pair(kind, backend, shuffle=False, batch_size="auto", solver="sgd")
    theirs.fit(X, y)
    ours.fit(X, y)
    _assert_same(theirs, ours)


ALL_BACKENDS = BACKENDS + [b for b in ("cupy",) if b in available_backends()]

#: Single-column or single-row weight matrices (gpubp's (n_out, n_in) layout), whose transpose
#: is already contiguous: a binary classifier's and a single-target regressor's output layer,
#: and a hidden layer of width 1.
ONE_WIDE = {
    "binary": ("binary", {}),
    "single": ("single", {}),
    "width-1": ("multiclass", {"hidden_layer_sizes": (6, 1)}),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", list(ONE_WIDE))
def test_early_stopping_keeps_the_best_epochs_weights_of_one_wide_layers(backend, case):
    """The kept best parameters are copies: they once shared memory with the live weights
    wherever a matrix has one row or column, and kept changing after the best epoch."""
    kind, extra = ONE_WIDE[case]
    X, y = _data(kind, seed=3, n=83)
    if kind == "multiclass":  # scikit-learn < 1.8 cannot early-stop on string labels
        y = np.unique(y, return_inverse=True)[1]
    params = dict(early_stopping=True, validation_fraction=0.2, n_iter_no_change=3, tol=0.0,
                  max_iter=25, solver="sgd", learning_rate_init=0.05, **extra)  # fmt: skip
    theirs, ours = _pair(kind, backend, **params)
    theirs.fit(X, y)
    ours.fit(X, y)
    # the best epoch is not the last one, else keeping the live weights would pass too
    assert np.argmax(theirs.validation_scores_) < theirs.n_iter_ - 1
    _assert_same(theirs, ours)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_diverging_training_with_early_stopping_returns_the_best_weights(backend):
    """Steps that overflow to NaN: scikit-learn keeps training (NaN scores never count as a
    stall) and then returns the best epoch's finite weights; so does gpubp, with no error."""
    X, y = _data("single", seed=0)
    params = dict(hidden_layer_sizes=(6,), solver="sgd", learning_rate_init=0.5, tol=0.0,
                  early_stopping=True, validation_fraction=0.2, n_iter_no_change=4,
                  max_iter=8)  # fmt: skip
    theirs, ours = _pair("single", backend, **params)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        theirs.fit(X, y)
        ours.fit(X, y)
    assert np.isnan(theirs.loss_curve_[-1])
    _assert_same(theirs, ours, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_returned_coefficients_share_no_memory(backend):
    """coefs_ / intercepts_ are the user's: no later fit, partial_fit or warm start writes
    into them, and they share no memory with the kept best weights."""
    X, y = _data("single", seed=5)
    est = MLPRegressor(hidden_layer_sizes=(1,), warm_start=True, max_iter=2, random_state=0,
                       backend=backend, solver="sgd", learning_rate_init=0.05)  # fmt: skip
    est.fit(X, y)
    for call in (lambda: est.fit(X, y), lambda: est.partial_fit(X, y)):
        arrays = est.coefs_ + est.intercepts_
        values = [a.copy() for a in arrays]
        call()
        for a, v in zip(arrays, values, strict=True):
            np.testing.assert_array_equal(a, v)
        for a in arrays:
            assert not any(np.shares_memory(a, b) for b in est.coefs_ + est.intercepts_)
    est = clone(est).set_params(early_stopping=True, warm_start=False, max_iter=4).fit(X, y)
    for a in est.coefs_ + est.intercepts_:
        assert not any(np.shares_memory(a, b) for b in est._best_coefs + est._best_intercepts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_partial_fit_and_warm_start(backend):
    X, y = _data("multiclass", seed=4)
    theirs, ours = _pair("multiclass", backend, solver="sgd", learning_rate_init=0.05)
    classes = np.unique(y)
    for start in (0, 20, 40):
        theirs.partial_fit(X[start : start + 20], y[start : start + 20], classes=classes)
        ours.partial_fit(X[start : start + 20], y[start : start + 20], classes=classes)
    _assert_same(theirs, ours)
    theirs, ours = _pair("single", backend, warm_start=True, max_iter=3)
    Xr, yr = _data("single", seed=4)
    for _ in range(2):
        theirs.fit(Xr, yr)
        ours.fit(Xr, yr)
    _assert_same(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_inputs_and_batch_of_one(backend):
    X, y = _data("single", seed=6, n=13, d=33, scale=1e3)
    theirs, ours = _pair("single", backend, batch_size=1, learning_rate_init=1e-5, max_iter=3)
    theirs.fit(X, y)
    ours.fit(X, y)
    _assert_same(theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_stays_float32_and_agrees_to_float_tolerance(backend):
    X, y = _data("multiclass", seed=7)
    X = X.astype(np.float32)
    theirs, ours = _pair("multiclass", backend)
    theirs.fit(X, y)
    ours.fit(X, y)
    assert ours.coefs_[0].dtype == np.float32
    _assert_same(theirs, ours, rtol=1e-4)
    forced = clone(ours).set_params(dtype="float32").fit(X.astype(np.float64), y)
    assert forced.coefs_[0].dtype == np.float32
    assert forced.predict_proba(X).dtype == np.float32


@pytest.mark.skipif("cupy" not in available_backends(), reason="the cupy backend cannot run here")
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_same_coefficients_on_the_cupy_backend(solver):
    """The CUDA kernels (on the emulated GPU where there is none) give scikit-learn's numbers."""
    X, y = _data("multiclass", seed=9, n=23)
    sw = np.random.default_rng(9).uniform(0.5, 2.0, X.shape[0])
    for fit_params in ({}, {"sample_weight": sw}) if SK_VERSION >= (1, 7) else ({},):
        theirs, ours = _pair("multiclass", "cupy", solver=solver, alpha=0.01, max_iter=2)
        theirs.fit(X, y, **fit_params)
        ours.fit(X, y, **fit_params)
        _assert_same(theirs, ours)
        np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-7)


def test_works_in_pipeline_grid_search_cross_val_and_clone():
    X, y = _data("binary", seed=8, n=90)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((8,), max_iter=20, random_state=0))
    pipe.fit(X, y)
    assert set(pipe.predict(X)) <= {"yes", "no"}
    search = GridSearchCV(pipe, {"mlpclassifier__alpha": [1e-4, 1e-1]}, cv=3).fit(X, y)
    assert search.best_params_["mlpclassifier__alpha"] in (1e-4, 1e-1)
    scores = cross_val_score(
        MLPRegressor(hidden_layer_sizes=(5,), max_iter=10), *_data("single", n=60), cv=3
    )
    assert scores.shape == (3,)
    for ours, theirs in ((MLPClassifier, sk.MLPClassifier), (MLPRegressor, sk.MLPRegressor)):
        # scikit-learn's parameters plus backend and dtype (and the regressor's loss, which
        # scikit-learn has from 1.7 on)
        mine, skl = set(ours().get_params()), set(theirs().get_params())
        assert skl <= mine and mine - skl - {"loss"} == {"backend", "dtype"}
        assert ours(**theirs(alpha=0.5).get_params()).get_params()["alpha"] == 0.5
    est = MLPClassifier((4, 3), solver="sgd", backend="numpy", dtype="float64")
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est


def test_clear_errors_and_a_rejected_call_changes_nothing():
    X, y = _data("multiclass")
    with pytest.raises(ValueError, match=r"solver must be one of 'sgd', 'adam', 'lbfgs'"):
        MLPClassifier(solver="newton").fit(X, y)
    with pytest.raises(ValueError, match=r"loss='poisson' needs targets y >= 0"):
        MLPRegressor(loss="poisson").fit(*_data("single"))
    with pytest.raises(ValueError, match="hidden_layer_sizes="):
        MLPRegressor((5,)).fit(*_data("single"))
    with pytest.raises(ValueError, match="hidden_layer_sizes"):
        MLPClassifier(hidden_layer_sizes=(3, 0)).fit(X, y)
    with pytest.raises(ValueError, match="momentum"):
        MLPClassifier(momentum=1.5).fit(X, y)
    for dtype in ("int32", "floaty"):
        with pytest.raises(ValueError, match="dtype"):
            MLPClassifier(dtype=dtype).fit(X, y)
    with pytest.raises(NotFittedError):
        MLPClassifier().predict(X)
    est = MLPClassifier((6,), max_iter=3, random_state=0, backend="numpy").fit(X, y)
    before = [c.copy() for c in est.coefs_]
    bad = X.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad, y)
    with pytest.raises(ValueError, match="features"):
        est.partial_fit(X[:, :5], y)
    with pytest.raises(ValueError, match="sample_weight"):
        est.partial_fit(X, y, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="early_stopping"):
        clone(est).set_params(early_stopping=True).partial_fit(X, y, classes=np.unique(y))
    for a, b in zip(before, est.coefs_):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_fit_that_diverges_leaves_the_coefficients_as_they_were(backend):
    """A warm-started fit whose steps overflow raises; coefs_ and intercepts_ (single-output:
    the last coefficient matrix is a column, whose transpose NumPy would not copy) keep their
    values. The step once updated views of them in place."""
    X, y = _data("single")
    est = MLPRegressor(hidden_layer_sizes=(5,), max_iter=3, solver="sgd", warm_start=True,
                       random_state=0, backend=backend).fit(X, y)  # fmt: skip
    coefs, intercepts = [c.copy() for c in est.coefs_], [b.copy() for b in est.intercepts_]
    est.set_params(learning_rate_init=1e30)
    with pytest.raises(ValueError, match="non-finite"):
        est.fit(X * 1e10, y * 1e10)
    for want, got in zip(coefs + intercepts, est.coefs_ + est.intercepts_, strict=True):
        np.testing.assert_array_equal(got, want)


def test_partial_fit_keeps_the_fitted_dtype():
    """float32 first, float64 next: the coefficients stay float32, as scikit-learn's do."""
    X, y = _data("multiclass")
    est = MLPClassifier((6,), random_state=0, backend="numpy")
    est.partial_fit(X.astype(np.float32), y, classes=np.unique(y))
    est.partial_fit(X.astype(np.float64), y)
    assert {c.dtype for c in est.coefs_ + est.intercepts_} == {np.dtype(np.float32)}
    ref = sk.MLPClassifier((6,), random_state=0)
    ref.partial_fit(X.astype(np.float32), y, classes=np.unique(y))
    ref.partial_fit(X.astype(np.float64), y)
    assert ref.coefs_[0].dtype == np.float32


def test_import_gpubp_does_not_import_sklearn():
    code = "import sys, gpubp; assert 'sklearn' not in sys.modules; gpubp.sklearn.MLPClassifier"
    subprocess.run([sys.executable, "-c", code], check=True)
