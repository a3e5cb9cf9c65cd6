"""scikit-learn estimators on gpubp's backends: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in replacements for ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor``
(solvers 'sgd', 'adam' and 'lbfgs'): the same parameters, attributes and methods, and, in
float64 with the same ``random_state``, the same coefficients after training, computed by
gpubp's fused kernels on the backend of your choice (``backend=``). Needs scikit-learn
(``pip install 'gpubp[sklearn]'``).
"""

from __future__ import annotations

try:
    import sklearn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gpubp.sklearn needs scikit-learn; install it with pip install 'gpubp[sklearn]'"
    ) from exc

#: The oldest scikit-learn with the estimator tags and validation API used here.
MIN_SKLEARN = (1, 6)

if tuple(int(p) for p in sklearn.__version__.split(".")[:2] if p.isdigit()) < MIN_SKLEARN:
    raise ImportError(
        f"gpubp.sklearn needs scikit-learn >= 1.6 (its estimator tags), found "
        f"{sklearn.__version__}; upgrade with pip install 'gpubp[sklearn]'"
    )

from ._estimators import MLPClassifier, MLPRegressor  # noqa: E402 (after the version check)

__all__ = ["MLPClassifier", "MLPRegressor"]
