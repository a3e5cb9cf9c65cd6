"""scikit-learn estimators on gpubp's backends: ``MLPClassifier`` and ``MLPRegressor``.

Drop-in replacements for ``sklearn.neural_network.MLPClassifier`` / ``MLPRegressor`` (solvers
'sgd' and 'adam'): the same parameters, attributes and methods, and, in float64 with the same
``random_state``, the same coefficients after training, computed by gpubp's fused kernels on
the backend of your choice (``backend=``). Needs scikit-learn (``pip install 'gpubp[sklearn]'``).
"""

from __future__ import annotations

try:
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gpubp.sklearn needs scikit-learn; install it with pip install 'gpubp[sklearn]'"
    ) from exc

from ._estimators import MLPClassifier, MLPRegressor

__all__ = ["MLPClassifier", "MLPRegressor"]
