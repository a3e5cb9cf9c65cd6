"""How :class:`gpubp.MLP` reads its inputs: arrays of any library (NumPy, lists, DLPack: PyTorch,
JAX, CuPy), checked for shape, dtype and finiteness, cast to the model's dtype on its backend,
and preprocessed by the model's :attr:`~InputChecks.preprocessing`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import dlpack
from .backends import Backend, to_numpy
from .optim import Optimizer
from .preprocessing import Preprocessing
from .sparse_inputs import SparseRows, check_sparse_x, is_sparse

__all__ = ["InputChecks", "check_dtype"]


def check_dtype(dtype: object) -> np.dtype[Any]:
    """``dtype`` as a NumPy dtype: float32 or float64, else :class:`ValueError`."""
    try:
        # None would mean float64 to NumPy; here it is a mistake, not a choice
        dt = None if dtype is None else np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        dt = None
    if dt is None or dt.name not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r} is not supported; expected 'float32' or 'float64'")
    return dt


class InputChecks:
    """The input half of :class:`gpubp.MLP` (a mixin: the model provides the attributes)."""

    backend: Backend
    dtype: np.dtype[Any]
    layer_sizes: tuple[int, ...]
    loss: str
    _pre: Preprocessing | None
    _pre_arrays: tuple[Any, Any] | None

    @property
    def n_inputs(self) -> int:
        """``n_0``, the width of an input row."""
        return self.layer_sizes[0]

    @property
    def n_outputs(self) -> int:
        """``n_L``, the width of an output row."""
        return self.layer_sizes[-1]

    @property
    def preprocessing(self) -> Preprocessing | None:
        """The input preprocessing ``x' = (x - shift) * scale`` applied before the first layer
        by every method that takes inputs, or ``None``. Assigning checks the width (``n_0``
        values) and leaves the model unchanged when it is wrong."""
        return self._pre

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | None) -> None:
        if value is None:
            self._pre, self._pre_arrays = None, None
            return
        if not isinstance(value, Preprocessing):
            raise TypeError(
                "preprocessing must be a gpubp.preprocessing.Preprocessing (for example "
                f"Preprocessing.standardize(X_train)) or None, got {type(value).__name__}"
            )
        if value.n_features != self.n_inputs:
            raise ValueError(
                f"preprocessing has {value.n_features} values per vector; expected "
                f"{self.n_inputs}, one per input of a model with layer_sizes "
                f"{list(self.layer_sizes)}"
            )
        be = self.backend
        self._pre_arrays = (
            be.asarray(value.shift, self.dtype),
            be.asarray(value.scale, self.dtype),
        )
        self._pre = value

    # --- input checks -----------------------------------------------------------------------

    def _array(self, value: Any, argument: str, labels: bool = False) -> Any:
        """``value`` as an array of this backend (NumPy arrays, lists, backend arrays, or any
        DLPack array: a view where it lives on the backend's device, see :mod:`gpubp.dlpack`);
        ``labels``: it holds targets, and a non-numeric dtype is refused with the way to map
        class names to integers."""
        be = self.backend
        if be.owns(value):
            arr = value
        elif dlpack.is_dlpack(value):  # PyTorch, JAX, CuPy: no copy on the same device
            arr = dlpack.from_dlpack(be, value, argument)
        else:
            try:
                host = to_numpy(value)
            except (ValueError, TypeError) as exc:
                raise TypeError(
                    f"{argument} must be an array or a nested list of numbers; could not read "
                    f"it as one ({exc})"
                ) from None
            if host.dtype.kind in "biuf":
                arr = be.asarray(host)
            else:
                arr = host
        kind = arr.dtype.kind
        if kind not in "biuf" and labels:
            raise TypeError(
                f"{argument} has dtype {arr.dtype}; class labels must be integers 0..k-1. Map "
                f"names (strings or other values) to them with classes, {argument} = "
                f"np.unique({argument}, return_inverse=True), or use "
                "gpubp.sklearn.MLPClassifier, which takes labels of any type"
            )
        if kind not in "biuf":
            raise TypeError(
                f"{argument} has dtype {arr.dtype}; expected real numbers (float or int). "
                "Convert it with np.asarray(..., dtype=np.float32)"
            )
        return arr

    def _all_finite(self, arr: Any) -> bool:
        if arr.dtype.kind != "f":
            return True
        xp = self.backend.xp
        # one cheap reduction; only a non-finite sum (which a huge finite input can also give)
        # pays for the elementwise test
        return math.isfinite(float(xp.sum(arr))) or bool(xp.isfinite(arr).all())

    def check_x(self, x: Any, argument: str = "x") -> Any:
        """``x`` checked as a batch ``(B, n_0)`` of finite numbers, cast to the model's dtype and
        on its backend; still raw (:meth:`prepare_x` also preprocesses it). A scipy.sparse ``x``
        stays sparse: a canonical CSR array on the host (:mod:`gpubp.sparse_inputs`)."""
        if is_sparse(x):
            return check_sparse_x(x, argument, self.n_inputs, self.dtype)
        arr = self._array(x, argument)
        if arr.ndim == 1 and self.n_inputs > 1 and arr.shape[0] == self.n_inputs:
            raise ValueError(
                f"{argument} has shape {tuple(arr.shape)}, one sample without a batch axis; "
                f"expected "
                f"(batch, {self.n_inputs}). Use {argument}[None, :] for a batch of one"
            )
        if arr.ndim != 2 or arr.shape[1] != self.n_inputs:
            raise ValueError(
                f"{argument} has shape {tuple(arr.shape)}; expected (batch, {self.n_inputs}) "
                f"for a model with layer_sizes {list(self.layer_sizes)}"
            )
        if arr.shape[0] == 0:
            raise ValueError(
                f"{argument} is an empty batch (shape {tuple(arr.shape)}); pass at least one row"
            )
        return self._cast_finite(arr, argument, "clean or rescale the inputs first")

    def prepare_x(self, x: Any, argument: str = "x") -> Any:
        """``x`` checked by :meth:`check_x`, then preprocessed: the network's input ``a^0``,
        what :meth:`step` expects (``x`` itself is never modified)."""
        return self._preprocess(self.check_x(x, argument))

    def _preprocess(self, x: Any) -> Any:
        if is_sparse(x):  # scaled, the shift folded into the first layer (never densified)
            return SparseRows.preprocessed(x, self._pre, self.backend, self.dtype)
        if self._pre_arrays is None:
            return x
        shift, scale = self._pre_arrays
        out = self.backend.xp.subtract(x, shift)
        out *= scale
        return out

    def _cast_finite(self, arr: Any, argument: str, advice: str) -> Any:
        """``arr`` in the model's dtype, refused if it holds NaN or infinity *after* the cast
        (a float64 value beyond the float32 range becomes inf there)."""
        if arr.dtype != self.dtype:
            with np.errstate(over="ignore"):
                arr = arr.astype(self.dtype)
        if not self._all_finite(arr):
            raise ValueError(
                f"{argument} contains NaN or infinity (or values beyond the range of "
                f"{self.dtype.name}); {advice}"
            )
        return arr

    def check_y(self, y: Any, batch: int, argument: str = "y") -> Any:
        """Validated targets for a batch of ``batch`` rows: integer labels ``(B,)`` or float
        targets ``(B, n_out)`` in the model's dtype, on its backend."""
        arr = self._array(y, argument, labels=True)
        n = self.n_outputs
        xp = self.backend.xp
        if arr.shape[:1] != (batch,):
            raise ValueError(
                f"{argument} has shape {tuple(arr.shape)} but x has {batch} rows; expected "
                f"{self._y_expectation()} with the same number of rows as x"
            )
        labels_ok = self.loss == "cross_entropy" or (self.loss == "mse" and n > 1)
        if arr.dtype.kind == "b":  # True/False: class labels 1/0, or targets 1.0/0.0
            arr = arr.astype(np.int64 if arr.ndim == 1 and labels_ok else self.dtype)
        if arr.ndim == 1 and arr.dtype.kind == "f" and labels_ok:
            arr = self._whole_labels(arr, argument)
        if arr.ndim == 1 and arr.dtype.kind in "iu" and labels_ok:
            lo, hi = int(xp.min(arr)), int(xp.max(arr))
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{argument} holds the label {bad}, out of range; labels must be integers in "
                    f"[0, {n - 1}] for a model with {n} outputs"
                )
            return arr.astype(np.int64) if arr.dtype != np.int64 else arr
        if arr.ndim == 1 and n == 1:
            arr = arr.reshape(batch, 1)
        if arr.ndim != 2 or arr.shape[1] != n:
            raise ValueError(
                f"{argument} has shape {tuple(arr.shape)} and dtype {arr.dtype}; expected "
                f"{self._y_expectation()}"
            )
        arr = self._cast_finite(arr, argument, "targets must be finite")
        if self.loss == "binary_cross_entropy":
            if float(xp.min(arr)) < 0 or float(xp.max(arr)) > 1:
                raise ValueError(
                    f"{argument} holds values outside [0, 1]; binary_cross_entropy needs targets "
                    "that are probabilities (0 or 1 for hard labels)"
                )
        elif self.loss == "cross_entropy":
            sums = xp.sum(arr, axis=1)
            if float(xp.min(arr)) < 0 or float(xp.max(xp.abs(sums - 1))) > 1e-3:
                raise ValueError(
                    f"{argument} rows must be one-hot (or probabilities summing to 1) for "
                    f"cross_entropy; pass integer labels of shape ({batch},) otherwise"
                )
        return arr

    def _whole_labels(self, arr: Any, argument: str) -> Any:
        """Float class labels ``(B,)`` (as ``np.loadtxt`` reads them) as int64, when every value
        is a whole number; else :class:`ValueError` naming the first that is not."""
        xp = self.backend.xp
        whole = xp.isfinite(arr) & (xp.floor(arr) == arr)
        if not bool(whole.all()):
            row = int(xp.argmin(whole))
            raise ValueError(
                f"{argument}[{row}] is {float(arr[row])!r}; class labels must be whole numbers "
                f"in [0, {self.n_outputs - 1}] (floats such as 3.0 are taken as 3). For "
                "regression targets use a model with output='identity', loss='mse'"
            )
        return arr.astype(np.int64)

    def _y_expectation(self) -> str:
        n = self.n_outputs
        if self.loss == "cross_entropy":
            return f"integer labels in [0, {n - 1}] of shape (batch,) or one-hot rows (batch, {n})"
        if self.loss == "binary_cross_entropy":
            return f"targets in [0, 1] of shape (batch, {n})" + (" or (batch,)" if n == 1 else "")
        if n == 1:
            return "float targets of shape (batch,) or (batch, 1)"
        return f"float targets of shape (batch, {n}) or integer class labels of shape (batch,)"


def check_optimizer(optimizer: object) -> Optimizer:
    """``optimizer`` itself if it is one of :mod:`gpubp.optim`'s, else a :class:`TypeError`."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a gpubp.optim optimizer such as gpubp.optim.SGD(lr=0.1), got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def check_layer_sizes(layer_sizes: object) -> tuple[int, ...]:
    """``layer_sizes`` as a tuple of at least two positive ints, or an error saying so."""
    msg = "layer_sizes must be a sequence of at least two positive ints, e.g. [784, 128, 10]"
    if isinstance(layer_sizes, np.ndarray) and layer_sizes.ndim == 1:
        layer_sizes = layer_sizes.tolist()
    if isinstance(layer_sizes, (str, bytes)) or not isinstance(layer_sizes, Sequence):
        raise TypeError(f"{msg}; got {layer_sizes!r}")
    sizes = tuple(layer_sizes)
    if len(sizes) < 2:
        raise ValueError(f"{msg}; got {sizes!r}")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{msg}; layer_sizes[{i}] is {n!r}")
    return tuple(int(n) for n in sizes)


def check_run(X: Any, order: Any, first: int, count: int, batch: int, lrs: Sequence[float]) -> None:
    """Refuse a run of steps (:meth:`gpubp.MLP.steps`) that would read outside ``order`` or
    ``X``: ``order`` 1-D integers in ``[0, N)``, ``first >= 0``, ``count`` batches of ``batch``
    rows from batch ``first`` within ``order``, a rate in ``lrs`` for each."""
    n = int(X.shape[0])
    kind = np.dtype(getattr(order, "dtype", object)).kind
    if getattr(order, "ndim", None) != 1 or kind not in "iu":
        raise TypeError(
            f"order must be a 1-D array of integer row indices; got "
            f"{type(order).__name__} {getattr(order, 'dtype', '')}"
        )
    for name, value in (("first", first), ("count", count), ("batch_size", batch)):
        if not isinstance(value, (int, np.integer)) or value < (1 if name == "batch_size" else 0):
            raise ValueError(f"{name} must be a non-negative integer (batch_size positive)")
    if batch > n or (first + count) * batch > order.shape[0] or len(lrs) < count:
        raise ValueError(
            f"{count} batches of {batch} rows from batch {first} need "
            f"{(first + count) * batch} entries of order (it has {order.shape[0]}), at most "
            f"{n} rows a batch (X has {n}) and {count} learning rates (lrs has {len(lrs)})"
        )
    part = order[first * batch : (first + count) * batch]
    if not isinstance(part, np.ndarray):  # on a device: no backend runs steps from there
        return
    if part.size and (int(part.min()) < 0 or int(part.max()) >= n):
        raise IndexError(f"order holds row indices outside [0, {n}), the rows of X")
