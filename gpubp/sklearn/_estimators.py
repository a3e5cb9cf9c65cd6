"""``MLPClassifier`` and ``MLPRegressor``: scikit-learn's estimators on gpubp's backends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, r2_score
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import type_of_target, unique_labels
from sklearn.utils.validation import column_or_1d, validate_data

from ..backends import Backend
from ._base import BaseMLP

_DOC_PARAMETERS = """
    Parameters
    ----------
    hidden_layer_sizes : int or sequence of int, default=(100,)
        Widths of the hidden layers.
    activation : {'identity', 'logistic', 'tanh', 'relu'}, default='relu'
        Hidden activation.
    solver : {'adam', 'sgd', 'lbfgs'}, default='adam'
        scikit-learn's Adam or SGD rule, or scipy's L-BFGS-B on the full batch (as
        scikit-learn runs it: see :mod:`gpubp.sklearn._lbfgs`).
    alpha : float, default=1e-4
        L2 penalty on the weights (not the biases): each batch adds ``alpha W / S`` to the
        weight gradients and ``alpha / (2 S) sum ||W||^2`` to the loss, ``S`` the batch's
        sample count (or sum of sample weights).
    batch_size : int or 'auto', default='auto'
        Rows per step; 'auto' is ``min(200, n_samples)``.
    learning_rate : {'constant', 'invscaling', 'adaptive'}, default='constant'
        SGD's schedule: fixed; ``learning_rate_init / (t + 1) ** power_t`` set at each epoch's
        end (``t`` the samples seen); divided by 5 whenever ``n_iter_no_change`` epochs do not
        improve by ``tol``.
    learning_rate_init : float, default=1e-3
    power_t : float, default=0.5
    max_iter : int, default=200
        Epochs ('lbfgs': L-BFGS-B iterations).
    shuffle : bool, default=True
        Shuffle the samples each epoch.
    random_state : int, RandomState or None, default=None
        Initial weights, shuffling and the early-stopping split, drawn exactly as
        scikit-learn draws them.
    tol : float, default=1e-4
    verbose : bool, default=False
    warm_start : bool, default=False
    momentum : float, default=0.9
        SGD: ``v = momentum v - lr g``, the step adds ``v``.
    nesterovs_momentum : bool, default=True
        SGD: the step adds ``momentum v - lr g`` instead.
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data, stop when its score stalls, keep the
        best parameters.
    validation_fraction : float, default=0.1
    beta_1, beta_2, epsilon : float, default=0.9, 0.999, 1e-8
        Adam: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, the step adds
        ``-lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + epsilon)``.
    n_iter_no_change : int, default=10
    max_fun : int, default=15000
        'lbfgs' only: the most loss evaluations L-BFGS-B may make.
    backend : str or Backend, default='auto'
        gpubp's backend: 'numpy', 'numba', 'cupy' or 'auto' (the best that runs here).
    dtype : {None, 'float32', 'float64'}, default=None
        Of the parameters and the arithmetic. None follows ``X`` as scikit-learn does:
        float32 input trains in float32, anything else in float64.
"""

_DOC_ATTRIBUTES = """
    Attributes
    ----------
    coefs_ : list of ndarray
        ``coefs_[l]`` has shape ``(n_l, n_{l+1})`` (scikit-learn's layout):
        ``a^{l+1} = f(a^l @ coefs_[l] + intercepts_[l])``.
    intercepts_ : list of ndarray
        ``intercepts_[l]`` has shape ``(n_{l+1},)``.
    loss_, best_loss_, loss_curve_ : float, float or None, list of float
        The mean training loss of the last epoch (with the L2 term), the lowest one (None with
        early stopping), one per epoch.
    validation_scores_, best_validation_score_ : list of float or None, float or None
        With early stopping: the held-out score after each epoch, the best one.
    n_iter_ : int
        Epochs run by the last call.
    t_ : int
        Samples seen by the solver (the ``t`` of 'invscaling').
    n_features_in_, feature_names_in_ : int, ndarray
    n_layers_, n_outputs_ : int
    out_activation_ : str
"""


class MLPClassifier(ClassifierMixin, BaseMLP):
    """A multi-layer perceptron classifier: scikit-learn's ``MLPClassifier`` on gpubp.

    The same parameters, attributes and numbers as
    ``sklearn.neural_network.MLPClassifier`` (solvers 'sgd', 'adam' and 'lbfgs'), with gpubp's
    ``backend`` and ``dtype``. Minimises the log loss: softmax output for more than two
    classes (``-1/S sum_i w_i sum_j Y_ij log a_ij``), a logistic output per column for binary
    and multi-label targets (binary log loss summed over the columns), plus the L2 term.
    """

    __doc__ = (
        (__doc__ or "")
        + _DOC_PARAMETERS
        + _DOC_ATTRIBUTES
        + """
    classes_ : ndarray or list of ndarray
        The class labels (any type: ints, strings...).
"""
    )

    def _validate_input(
        self, X: Any, y: Any, incremental: bool, reset: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(
            self,
            X,
            y,
            accept_sparse=["csr", "csc"],
            multi_output=True,
            dtype=(np.float64, np.float32),
            reset=reset,
        )
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if not hasattr(self, "classes_") or (not self.warm_start and not incremental):
            self._label_binarizer = LabelBinarizer()
            self._label_binarizer.fit(y)
            self.classes_ = self._label_binarizer.classes_
        else:
            classes = unique_labels(y)
            if self.warm_start:
                if set(classes) != set(self.classes_):
                    raise ValueError(
                        "warm_start can only be used where `y` has the same classes as in the "
                        f"previous call to fit. Previously got {self.classes_}, `y` has "
                        f"{classes}"
                    )
            elif len(np.setdiff1d(classes, self.classes_, assume_unique=True)):
                raise ValueError(
                    f"`y` has classes not in `self.classes_`. `self.classes_` has "
                    f"{self.classes_}. 'y' has {classes}."
                )
        return X, self._label_binarizer.transform(y).astype(bool)

    def _output_activation(self) -> str:
        return "softmax" if self._label_binarizer.y_type_ == "multiclass" else "logistic"

    def _decode(self, y: np.ndarray) -> np.ndarray:
        return self._label_binarizer.inverse_transform(y)

    def _predict_from_output(self, out: np.ndarray) -> np.ndarray:
        if self.n_outputs_ == 1:
            out = out.ravel()
        return self._label_binarizer.inverse_transform(out)

    def _score_function(self, y: Any, y_pred: Any, sample_weight: Any) -> float:
        return float(accuracy_score(y, y_pred, sample_weight=sample_weight))

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPClassifier:
        """Train on ``X`` ``(n_samples, n_features)`` and labels ``y`` ``(n_samples,)``
        (any label type) or a 0/1 indicator matrix ``(n_samples, n_labels)`` (multi-label);
        ``sample_weight`` ``(n_samples,)`` weights each sample's loss. Returns ``self``."""
        self._fit(X, y, sample_weight, incremental=False)
        return self

    @available_if(lambda est: est._check_solver())
    def partial_fit(
        self, X: Any, y: Any, sample_weight: Any = None, classes: Any = None
    ) -> MLPClassifier:
        """One epoch over ``(X, y)`` from the current parameters and optimizer state.

        ``classes`` (every label of the whole problem) is required on the first call.
        """
        first = getattr(self, "classes_", None) is None
        if first and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if classes is not None:
            classes = unique_labels(classes)
            if not first and not np.array_equal(self.classes_, classes):
                raise ValueError(
                    f"`classes={classes}` is not the same as on the last call to partial_fit, "
                    f"was: {self.classes_}"
                )
        if first:
            binarizer = LabelBinarizer()
            binarizer.fit(y if type_of_target(y).startswith("multilabel") else classes)
            self._label_binarizer = binarizer
            self.classes_ = binarizer.classes_
        self._fit(X, y, sample_weight, incremental=True)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Class labels ``(n_samples,)`` (or the indicator matrix for multi-label targets)."""
        return self._predict_from_output(self._forward_pass_fast(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)``, columns in the order of
        ``classes_`` (per-label probabilities for multi-label targets)."""
        y_pred = self._forward_pass_fast(X)
        if self.n_outputs_ == 1:
            y_pred = y_pred.ravel()
        if y_pred.ndim == 1:
            return np.vstack([1 - y_pred, y_pred]).T
        return y_pred

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log(predict_proba(X))``."""
        y_prob = self.predict_proba(X)
        return np.log(y_prob, out=y_prob)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        tags.input_tags.sparse = True
        return tags


class MLPRegressor(RegressorMixin, BaseMLP):
    """A multi-layer perceptron regressor: scikit-learn's ``MLPRegressor`` on gpubp.

    The same parameters, attributes and numbers as ``sklearn.neural_network.MLPRegressor``
    (solvers 'sgd', 'adam' and 'lbfgs', losses 'squared_error' and 'poisson'), with gpubp's
    ``backend`` and ``dtype``. Minimises ``1/S sum_i w_i ||a_i - y_i||^2 / (2 n_outputs)`` plus
    the L2 term, through an identity output (scikit-learn steps along the gradient of the sum
    over the outputs, and so does this), or with ``loss='poisson'`` half the Poisson deviance
    through an exponential output.
    """

    __doc__ = (
        (__doc__ or "")
        + """
    Parameters
    ----------
    loss : {'squared_error', 'poisson'}, default='squared_error'
        Half the squared error through an identity output, or half the Poisson deviance
        ``1/S sum_i w_i sum_j [y_ij log(y_ij / a_ij) - y_ij + a_ij]`` through an exponential
        output ``a = exp(z)`` (targets ``y >= 0``), as scikit-learn defines them.
"""
        + _DOC_PARAMETERS.replace("    Parameters\n    ----------\n", "")
        + _DOC_ATTRIBUTES
    )

    def __init__(
        self,
        loss: str = "squared_error",
        hidden_layer_sizes: int | Iterable[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 0.0001,
        batch_size: int | str = "auto",
        learning_rate: str = "constant",
        learning_rate_init: float = 0.001,
        power_t: float = 0.5,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: int | np.random.RandomState | None = None,
        tol: float = 1e-4,
        verbose: bool | int = False,
        warm_start: bool = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int | float = 10,
        max_fun: int = 15000,
        backend: str | Backend = "auto",
        dtype: str | None = None,
    ) -> None:
        self.loss = loss
        super().__init__(
            hidden_layer_sizes,
            activation,
            solver=solver,
            alpha=alpha,
            batch_size=batch_size,
            learning_rate=learning_rate,
            learning_rate_init=learning_rate_init,
            power_t=power_t,
            max_iter=max_iter,
            shuffle=shuffle,
            random_state=random_state,
            tol=tol,
            verbose=verbose,
            warm_start=warm_start,
            momentum=momentum,
            nesterovs_momentum=nesterovs_momentum,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            n_iter_no_change=n_iter_no_change,
            max_fun=max_fun,
            backend=backend,
            dtype=dtype,
        )

    def _check_extra_params(self) -> None:
        if self.loss not in ("squared_error", "poisson"):
            hint = (
                "; the first positional argument of MLPRegressor is loss (as in scikit-learn), "
                "so pass the widths as hidden_layer_sizes=..."
                if not isinstance(self.loss, str)
                else ""
            )
            raise ValueError(f"loss must be 'squared_error' or 'poisson'; got {self.loss!r}{hint}")

    def _validate_input(
        self, X: Any, y: Any, incremental: bool, reset: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(
            self,
            X,
            y,
            multi_output=True,
            y_numeric=True,
            accept_sparse=["csr", "csc"],
            dtype=(np.float64, np.float32),
            reset=reset,
        )
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        if self.loss == "poisson" and np.any(y < 0):
            raise ValueError(
                "loss='poisson' needs targets y >= 0 (counts or rates); y has negative values. "
                "Use loss='squared_error' for signed targets"
            )
        return X, y

    def _output_activation(self) -> str:
        return "exp" if self.loss == "poisson" else "identity"

    def _decode(self, y: np.ndarray) -> np.ndarray:
        return y

    def _predict_from_output(self, out: np.ndarray) -> np.ndarray:
        return out.ravel() if out.shape[1] == 1 else out

    def _score_function(self, y: Any, y_pred: Any, sample_weight: Any) -> float:
        return float(r2_score(y, y_pred, sample_weight=sample_weight))

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """Train on ``X`` ``(n_samples, n_features)`` and targets ``y`` ``(n_samples,)`` or
        ``(n_samples, n_outputs)``; ``sample_weight`` ``(n_samples,)`` weights each sample's
        loss. Returns ``self``."""
        self._fit(X, y, sample_weight, incremental=False)
        return self

    # scikit-learn's regressor tests the method itself, not its result, so partial_fit stays
    # visible for 'lbfgs' there (and runs a whole L-BFGS fit from the current weights): the same
    @available_if(lambda est: bool(est._check_solver))
    def partial_fit(self, X: Any, y: Any, sample_weight: Any = None) -> MLPRegressor:
        """One epoch over ``(X, y)`` from the current parameters and optimizer state (with
        ``solver='lbfgs'``, as in scikit-learn: an L-BFGS fit from the current parameters)."""
        self._fit(X, y, sample_weight, incremental=True)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions ``(n_samples,)``, or ``(n_samples, n_outputs)`` for several outputs."""
        return self._predict_from_output(self._forward_pass_fast(X))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
