"""scikit-learn's own estimator suite on gpubp's estimators, on the NumPy and Numba backends."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn", minversion="1.6")

from sklearn.utils.estimator_checks import parametrize_with_checks

from gpubp.backends import available_backends
from gpubp.sklearn import MLPClassifier, MLPRegressor

BACKENDS = [b for b in ("numpy", "numba") if b in available_backends()]

ESTIMATORS = [
    cls(max_iter=100, backend=backend)
    for backend in BACKENDS
    for cls in (MLPClassifier, MLPRegressor)
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
