"""What the two estimators share: parameters, their checks, the fit loop, prediction.

The loop is scikit-learn's ``BaseMultilayerPerceptron._fit_stochastic``, decision for decision
(initialisation, batch order, early stopping, ``tol`` and ``n_iter_no_change``, the learning
rate schedules, ``loss_curve_``, ``t_``), so that with the same ``random_state`` the same
numbers come out; each step runs on a gpubp backend (:mod:`gpubp.sklearn._solver`).
``solver='lbfgs'`` is scikit-learn's ``_fit_lbfgs`` (:mod:`gpubp.sklearn._lbfgs`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, is_classifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state, shuffle
from sklearn.utils.validation import check_is_fitted, validate_data

from ..backends import Backend, get_backend
from ._lbfgs import FullBatch, minimize
from ._solver import AdamRule, Batches, Network, SGDRule
from ._validation import check_sample_weight, dtype_name, fail, is_bool, is_int, is_real

_STOCHASTIC_SOLVERS = ("sgd", "adam")


class BaseMLP(BaseEstimator):
    """Shared implementation of :class:`MLPClassifier` and :class:`MLPRegressor`."""

    _out_activation: str  # set by the subclasses' _initialize

    def __init__(
        self,
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
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.backend = backend
        self.dtype = dtype

    # --- parameter checks (at fit time, as scikit-learn does) -------------------------------

    def _check_params(self) -> list[int]:
        """Check every hyper-parameter; the hidden widths as a list."""
        sizes = self.hidden_layer_sizes
        hidden = [sizes] if not hasattr(sizes, "__iter__") or isinstance(sizes, str) else sizes
        hidden = list(hidden)
        if not all(is_int(n) and n >= 1 for n in hidden):
            raise fail(
                "hidden_layer_sizes", sizes, "a positive int or a sequence of them, e.g. (100,)"
            )
        choices = {
            "activation": ("identity", "logistic", "tanh", "relu"),
            "solver": (*_STOCHASTIC_SOLVERS, "lbfgs"),
            "learning_rate": ("constant", "invscaling", "adaptive"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise fail(name, getattr(self, name), "one of " + ", ".join(map(repr, allowed)))
        checks: list[tuple[str, Any, str]] = [
            ("alpha", lambda v: is_real(v) and 0 <= v < math.inf, "a number >= 0"),
            ("learning_rate_init", lambda v: is_real(v) and 0 < v < math.inf, "a number > 0"),
            ("power_t", lambda v: is_real(v) and 0 <= v < math.inf, "a number >= 0"),
            ("max_iter", lambda v: is_int(v) and v >= 1, "an int >= 1"),
            ("max_fun", lambda v: is_int(v) and v >= 1, "an int >= 1"),
            ("tol", lambda v: is_real(v) and 0 <= v < math.inf, "a number >= 0"),
            ("momentum", lambda v: is_real(v) and 0 <= v <= 1, "a number in [0, 1]"),
            ("validation_fraction", lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
            ("beta_1", lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
            ("beta_2", lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)"),
            ("epsilon", lambda v: is_real(v) and 0 < v < math.inf, "a number > 0"),
            (
                "n_iter_no_change",
                lambda v: (is_int(v) and v >= 1) or (is_real(v) and v == math.inf),
                "an int >= 1 or numpy.inf",
            ),
            (
                "batch_size",
                lambda v: v == "auto" if isinstance(v, str) else is_int(v) and v >= 1,
                "'auto' or an int >= 1",
            ),
        ]
        for name, ok, expected in checks:
            if not ok(getattr(self, name)):
                raise fail(name, getattr(self, name), expected)
        for name in ("shuffle", "warm_start", "nesterovs_momentum", "early_stopping"):
            if not is_bool(getattr(self, name)):
                raise fail(name, getattr(self, name), "True or False")
        if not (is_bool(self.verbose) or is_int(self.verbose)):
            raise fail("verbose", self.verbose, "a bool or an int")
        if self.dtype is not None and dtype_name(self.dtype) not in ("float32", "float64"):
            raise fail(
                "dtype",
                self.dtype,
                "None (follow X: float32 stays float32, the rest "
                "becomes float64), 'float32' or 'float64'",
            )
        self._check_extra_params()
        return [int(n) for n in hidden]

    def _check_extra_params(self) -> None:
        """Subclass hook for their own parameters."""

    def _compute_dtype(self, X: np.ndarray) -> np.dtype[Any]:
        return np.dtype(self.dtype) if self.dtype is not None else X.dtype

    # --- fit --------------------------------------------------------------------------------

    def _validate_input(
        self, X: Any, y: Any, incremental: bool, reset: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _initialize(self, y: np.ndarray, layer_units: list[int], dtype: np.dtype[Any]) -> None:
        """scikit-learn's initialisation: counters, output activation, Glorot-uniform
        coefficients and intercepts (bound ``sqrt(f / (fan_in + fan_out))``, ``f = 2`` for
        logistic hidden units, else 6), drawn layer by layer from ``self._random_state``."""
        self.n_iter_ = 0
        self.t_ = 0
        self.n_outputs_ = y.shape[1]
        self.n_layers_ = len(layer_units)
        self.out_activation_ = self._output_activation()
        self.coefs_: list[np.ndarray] = []
        self.intercepts_: list[np.ndarray] = []
        factor = 2.0 if self.activation == "logistic" else 6.0
        for fan_in, fan_out in itertools.pairwise(layer_units):
            bound = np.sqrt(factor / (fan_in + fan_out))
            coef = self._random_state.uniform(-bound, bound, (fan_in, fan_out))
            intercept = self._random_state.uniform(-bound, bound, fan_out)
            self.coefs_.append(coef.astype(dtype, copy=False))
            self.intercepts_.append(intercept.astype(dtype, copy=False))
        self._best_coefs = [c.copy() for c in self.coefs_]
        self._best_intercepts = [i.copy() for i in self.intercepts_]
        if self.solver == "lbfgs":  # as scikit-learn: no epochs, no curve, no early stopping
            return
        self.loss_curve_: list[float] = []
        self._no_improvement_count = 0
        if self.early_stopping:
            self.validation_scores_: list[float] | None = []
            self.best_validation_score_: float | None = -np.inf
            self.best_loss_: float | None = None
        else:
            self.best_loss_ = np.inf
            self.validation_scores_ = None
            self.best_validation_score_ = None

    def _output_activation(self) -> str:
        raise NotImplementedError

    def _fit(self, X: Any, y: Any, sample_weight: Any, incremental: bool) -> BaseMLP:
        hidden = self._check_params()
        if self.early_stopping and incremental and self.solver != "lbfgs":
            raise ValueError(
                "partial_fit does not support early_stopping=True; set early_stopping=False "
                "or use fit"
            )
        backend = get_backend(self.backend)
        first_pass = not hasattr(self, "coefs_") or (not self.warm_start and not incremental)
        X, y = self._validate_input(X, y, incremental, reset=first_pass)
        sw = None if sample_weight is None else check_sample_weight(sample_weight, X)
        if y.ndim == 1:
            y = y.reshape((-1, 1))
        layer_units = [X.shape[1], *hidden, y.shape[1]]
        if not first_pass:
            shapes = [c.shape for c in self.coefs_]
            if shapes != list(itertools.pairwise(layer_units)):
                raise ValueError(
                    f"the fitted coefs_ have shapes {shapes}, which do not match "
                    f"hidden_layer_sizes={self.hidden_layer_sizes!r} and targets with "
                    f"{y.shape[1]} outputs; fit from scratch (warm_start=False) to change them"
                )
        self.n_outputs_ = y.shape[1]
        self._random_state = check_random_state(self.random_state)
        # a fitted model keeps its dtype (as scikit-learn's does): later data is cast to it
        dtype = self._compute_dtype(X) if first_pass else self.coefs_[0].dtype
        if first_pass:
            self._initialize(y, layer_units, dtype)
        net = self._network(backend, dtype, train=self.solver != "lbfgs", sparse=sp.issparse(X))
        if self.solver == "lbfgs":
            coefs, intercepts = self._fit_lbfgs(net, X, y, sw)
        else:
            coefs, intercepts = self._fit_stochastic(net, X, y, sw, incremental)
        if not all(np.isfinite(p).all() for p in (*coefs, *intercepts)):
            raise ValueError(
                "Solver produced non-finite parameter weights. The input data may contain "
                "large values and need to be preprocessed (e.g. with StandardScaler); the "
                "coefficients were left as they were before this call"
            )
        self.coefs_, self.intercepts_ = coefs, intercepts
        return self

    def _network(
        self, backend: Backend, dtype: np.dtype[Any], *, train: bool, sparse: bool = False
    ) -> Network:
        """A :class:`Network` on ``backend`` with copies of ``coefs_`` and ``intercepts_``."""
        return Network(backend, self.coefs_, self.intercepts_, self.activation,
                       self.out_activation_, self.alpha, dtype, train=train,
                       sparse=sparse)  # fmt: skip

    def _fit_lbfgs(
        self, net: Network, X: np.ndarray, y: np.ndarray, sw: np.ndarray | None
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """scikit-learn's ``_fit_lbfgs``: L-BFGS-B on the full batch (:mod:`._lbfgs`) from
        the current parameters; sets ``n_iter_`` and ``loss_``; the coefficients to keep.

        With ``dtype=None`` these are scipy's answer in float64, as scikit-learn returns them
        (scipy evaluates a float32 model in float32 but keeps its iterate in float64)."""
        objective = FullBatch(net, X, y, sw)
        self.n_iter_, self.loss_, theta = minimize(
            objective, self.max_iter, self.max_fun, self.tol, self.verbose
        )
        return objective.split(theta) if self.dtype is None else net.coefs()

    def _loss_grad_lbfgs(
        self, packed_coef_inter: np.ndarray, X: Any, y: Any, sample_weight: Any, *buffers: Any
    ) -> tuple[float, np.ndarray]:
        """scikit-learn's hook of the same name (its tests call it): ``(f(theta), grad)`` on
        ``X`` and the encoded targets ``y`` at ``theta = packed_coef_inter`` (see
        :mod:`gpubp.sklearn._lbfgs`); ``buffers`` (scikit-learn's work arrays) are not used."""
        check_is_fitted(self)
        dtype = self.coefs_[0].dtype
        net = self._network(get_backend(self.backend), dtype, train=False, sparse=sp.issparse(X))
        Y = np.asarray(y, dtype=dtype).reshape(X.shape[0], -1)
        sw = None if sample_weight is None else np.asarray(sample_weight, dtype=dtype)
        X = X if sp.issparse(X) else np.asarray(X, dtype=dtype)
        return FullBatch(net, X, Y, sw)(packed_coef_inter)

    def _check_solver(self) -> bool:
        """Whether ``partial_fit`` exists: only for the stochastic solvers (scikit-learn's
        ``AttributeError`` otherwise)."""
        if self.solver not in _STOCHASTIC_SOLVERS:
            raise AttributeError(
                "partial_fit is only available for stochastic optimizers. "
                f"{self.solver} is not stochastic."
            )
        return True

    def _fit_stochastic(
        self, net: Network, X: np.ndarray, y: np.ndarray, sw: np.ndarray | None, incremental: bool
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """scikit-learn's epoch loop: train ``net`` on ``X``, ``y`` (and ``sw``) for up to
        ``max_iter`` epochs (one if ``incremental``); the coefficients to keep."""
        optimizer = self._solver_rule(net, incremental)
        val = None
        if self.early_stopping:
            X, y, sw, val = self._hold_out_validation(X, y, sw)
        n_samples = X.shape[0]
        batches = Batches(net, X, y, sw, self._batch_size(n_samples))
        sample_idx = np.arange(n_samples, dtype=int)
        try:
            self.n_iter_ = 0
            for _ in range(self.max_iter):
                if self.shuffle:
                    sample_idx = shuffle(sample_idx, random_state=self._random_state)
                accumulated = batches.epoch(optimizer, sample_idx if self.shuffle else None)
                self._end_epoch(net, optimizer, float(accumulated) / n_samples, n_samples, val)
                if self._stop_after_epoch(optimizer) or incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn(
                        f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and "
                        "the optimization hasn't converged yet.",
                        ConvergenceWarning,
                        stacklevel=3,
                    )
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.", stacklevel=3)
        if self.early_stopping:  # copies: the kept best stays the kept best whatever happens
            return [c.copy() for c in self._best_coefs], [b.copy() for b in self._best_intercepts]
        return net.coefs()

    def _solver_rule(self, net: Network, incremental: bool) -> SGDRule | AdamRule:
        """The update rule with its state: kept from the last call by ``partial_fit``, else new."""
        if not incremental or not hasattr(self, "_optimizer"):
            if self.solver == "sgd":
                self._optimizer: SGDRule | AdamRule = SGDRule(
                    net.xp,
                    net.params,
                    self.learning_rate_init,
                    self.learning_rate,
                    self.momentum,
                    self.nesterovs_momentum,
                    self.power_t,
                )
            else:
                self._optimizer = AdamRule(
                    net.xp,
                    net.params,
                    self.learning_rate_init,
                    self.beta_1,
                    self.beta_2,
                    self.epsilon,
                )
        return self._optimizer

    def _hold_out_validation(
        self, X: np.ndarray, y: np.ndarray, sw: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[Any, Any, Any]]:
        """``(X, y, sw)`` less the validation set, and ``(X_val, y_val, sw_val)`` with ``y_val``
        decoded: scikit-learn's split (stratified for a single-output classifier), drawn from
        ``self._random_state``."""
        stratify = y if is_classifier(self) and self.n_outputs_ == 1 else None
        arrays = [X, y] if sw is None else [X, y, sw]
        split = train_test_split(
            *arrays,
            random_state=self._random_state,
            test_size=self.validation_fraction,
            stratify=stratify,
        )
        X, X_val, y, y_val = split[:4]
        sw_val = None
        if sw is not None:
            sw, sw_val = split[4:]
        if X_val.shape[0] < 2:
            raise ValueError(
                "The validation set is too small. Increase 'validation_fraction' or the "
                "size of your dataset."
            )
        return X, y, sw, (X_val, self._decode(y_val), sw_val)

    def _batch_size(self, n_samples: int) -> int:
        """``batch_size`` for ``n_samples`` rows: ``auto`` is ``min(200, n)``; a larger one is
        clipped to ``n`` with scikit-learn's warning."""
        if isinstance(self.batch_size, str):  # "auto", the only string _check_params lets by
            return min(200, n_samples)
        if self.batch_size > n_samples:
            warnings.warn(
                "Got `batch_size` less than 1 or larger than sample size. It is going to "
                "be clipped",
                stacklevel=4,  # the same frame as when this was inline in _fit_stochastic
            )
        return int(np.clip(self.batch_size, 1, n_samples))

    def _end_epoch(
        self,
        net: Network,
        optimizer: SGDRule | AdamRule,
        loss: float,
        n_samples: int,
        val: tuple[Any, Any, Any] | None,
    ) -> None:
        """Record a finished epoch of mean training loss ``loss``: the counters, the loss curve,
        the verbose line, the no-improvement count, the learning-rate schedule."""
        self.n_iter_ += 1
        self.loss_ = loss
        self.t_ += n_samples
        self.loss_curve_.append(self.loss_)
        if self.verbose:
            print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
        self._update_no_improvement_count(net, val)
        optimizer.iteration_ends(self.t_)

    def _stop_after_epoch(self, optimizer: SGDRule | AdamRule) -> bool:
        """Whether progress stalled for ``n_iter_no_change`` epochs and the rule says stop
        (``adaptive`` lowers its rate instead while it can; then the count starts again)."""
        if self._no_improvement_count <= self.n_iter_no_change:
            return False
        what = "Validation score" if self.early_stopping else "Training loss"
        msg = (
            f"{what} did not improve more than tol={self.tol:f} for "
            f"{self.n_iter_no_change} consecutive epochs."
        )
        if optimizer.trigger_stopping(msg, bool(self.verbose)):
            return True
        self._no_improvement_count = 0
        return False

    def _update_no_improvement_count(self, net: Network, val: tuple[Any, Any, Any] | None) -> None:
        """Count an epoch without improvement of the validation score (``val``: early
        stopping) or of the training loss by more than ``tol``; keep the best."""
        if val is not None:
            score = self._score_net(net, *val)
            assert self.validation_scores_ is not None and self.best_validation_score_ is not None
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                self._best_coefs, self._best_intercepts = net.coefs()
        else:
            assert self.best_loss_ is not None
            if self.loss_curve_[-1] > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if self.loss_curve_[-1] < self.best_loss_:
                self.best_loss_ = self.loss_curve_[-1]

    # --- prediction -------------------------------------------------------------------------

    def _decode(self, y: np.ndarray) -> np.ndarray:
        """Targets as the user gave them, from the encoded ``(n, n_outputs)`` form."""
        raise NotImplementedError

    def _score_function(self, y: Any, y_pred: Any, sample_weight: Any) -> float:
        raise NotImplementedError

    def _score_net(self, net: Network, X: np.ndarray, y: Any, sw: Any) -> float:
        """The validation score of the current parameters (NaN if the outputs are not
        finite)."""
        out = net.forward(X)
        if not np.isfinite(out).all():
            return float("nan")
        return float(self._score_function(y, self._predict_from_output(out), sw))

    def _predict_from_output(self, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _forward_pass_fast(self, X: Any) -> np.ndarray:
        """The output layer's activations ``(n_samples, n_outputs_)`` for ``X``."""
        check_is_fitted(self)
        X = validate_data(
            self, X, accept_sparse=["csr", "csc"], dtype=(np.float64, np.float32), reset=False
        )
        backend, dtype = get_backend(self.backend), self.coefs_[0].dtype
        net = self._network(backend, dtype, train=False, sparse=sp.issparse(X))
        return net.forward(X)
