"""Input preprocessing a model carries: ``x' = (x - shift) * scale``, feature by feature.

A model with a :class:`Preprocessing` takes *raw* inputs everywhere (``forward``, ``predict``,
``evaluate``, ``fit``, ``train_step``, ``gradients``) and applies it as the first operation of
the forward pass, in the model's dtype on the backend's device. It is saved in the model file
(two float64 arrays, no pickle), so a loaded model gives the same answers on raw data as the
model that was saved.

The arithmetic is the model's (float32 or float64), as for the rest of the network: a float32
model reads raw features to about 7 significant digits, so a feature whose offset dwarfs its
spread by many orders of magnitude (timestamps in seconds, spread over minutes) should be
centred before it reaches a float32 model, or the model made float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Preprocessing"]


def _vector(value: Any, argument: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{argument} must be a 1-D array of numbers ({exc})") from None
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise ValueError(
            f"{argument} has shape {arr.shape}; expected a non-empty 1-D array, one value per "
            "input feature"
        )
    if not np.isfinite(arr).all():
        raise ValueError(f"{argument} contains NaN or infinity; every value must be finite")
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """``x' = (x - shift) * scale`` elementwise over the features of a batch ``x`` ``(B, n)``.

    Parameters
    ----------
    shift, scale : array_like, shape (n,)
        Finite numbers, stored as read-only float64 copies.
    kind : str
        What it is, for people: ``"standardize"``, ``"custom"``, ...
    description : str
        What the raw inputs are and how they are mapped (saved in the model file).

    Examples
    --------
    >>> import numpy as np
    >>> p = Preprocessing.standardize(np.array([[0.0, 10.0], [2.0, 30.0]]))
    >>> p.shift.tolist(), p.scale.tolist()
    ([1.0, 20.0], [1.0, 0.1])
    """

    shift: np.ndarray
    scale: np.ndarray
    kind: str = "custom"
    description: str = ""

    def __post_init__(self) -> None:
        shift = _vector(self.shift, "shift")
        scale = _vector(self.scale, "scale")
        if shift.shape != scale.shape:
            raise ValueError(
                f"shift has {shift.shape[0]} values and scale {scale.shape[0]}; expected one "
                "of each per input feature"
            )
        if not isinstance(self.kind, str) or not isinstance(self.description, str):
            raise TypeError("kind and description must be strings")
        object.__setattr__(self, "shift", shift)
        object.__setattr__(self, "scale", scale)

    @property
    def n_features(self) -> int:
        """``n``, the number of input features it applies to."""
        return int(self.shift.shape[0])

    @classmethod
    def standardize(cls, X: Any, per_feature: bool = True, description: str = "") -> Preprocessing:
        """Zero mean and unit standard deviation on ``X`` ``(N, n)`` (the training inputs).

        ``per_feature=True``: ``shift_j = mean_i X_ij``, ``scale_j = 1 / std_i X_ij`` (a
        constant feature gets scale 1: it is only centred), as scikit-learn's
        ``StandardScaler``. ``per_feature=False``: one mean and one standard deviation over all
        of ``X``, as ``gpubp train`` standardises images.
        """
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(
                f"X has shape {arr.shape}; expected a non-empty 2-D array (samples, features)"
            )
        if not np.isfinite(arr).all():
            raise ValueError("X contains NaN or infinity; clean the data first")
        n = arr.shape[1]
        if per_feature:
            mean, std = arr.mean(axis=0), arr.std(axis=0)
        else:
            mean, std = np.full(n, arr.mean()), np.full(n, arr.std())
        std = np.where(std > 0, std, 1.0)
        how = "per feature" if per_feature else "one mean and deviation over all features"
        return cls(mean, 1.0 / std, "standardize", description or f"standardize ({how})")

    @classmethod
    def affine(
        cls,
        mean: float,
        std: float,
        n_features: int,
        kind: str = "standardize",
        description: str = "",
    ) -> Preprocessing:
        """``(x - mean) / std`` with the same ``mean`` and ``std`` for all ``n_features``."""
        if not (np.isfinite(std) and std > 0):
            raise ValueError(f"std must be a positive finite number, got {std!r}")
        shift = np.full(n_features, float(mean))
        return cls(shift, np.full(n_features, 1.0 / std), kind, description)

    def apply(self, x: Any, xp: Any = np, dtype: Any = None) -> Any:
        """``(x - shift) * scale`` as a new array of ``xp`` in ``dtype`` (by default ``x``'s if
        it is a float array, else float64); ``x`` ``(B, n)`` is not modified."""
        if dtype is None:
            kind = getattr(getattr(x, "dtype", None), "kind", "")
            dtype = x.dtype if kind == "f" else np.float64
        shift = xp.asarray(self.shift, dtype=dtype)
        scale = xp.asarray(self.scale, dtype=dtype)
        out = xp.subtract(xp.asarray(x, dtype=dtype), shift)
        out *= scale
        return out

    def inverse(self, x: Any) -> np.ndarray:
        """``x' / scale + shift``: raw inputs back from preprocessed ones (NumPy, float64)."""
        return np.asarray(x, dtype=np.float64) / self.scale + self.shift

    def meta(self) -> dict[str, str]:
        """The JSON part saved in a model file (the arrays are saved beside it)."""
        return {"kind": self.kind, "description": self.description}

    def equals(self, other: Preprocessing | None, rtol: float = 1e-12) -> bool:
        """Same shape and values within ``rtol`` (relative)."""
        return (
            other is not None
            and other.shift.shape == self.shift.shape
            and bool(np.allclose(other.shift, self.shift, rtol=rtol, atol=0))
            and bool(np.allclose(other.scale, self.scale, rtol=rtol, atol=0))
        )
