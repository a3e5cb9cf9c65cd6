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

Below it, the standardisation ``gpubp train`` applies to a dataset before training (one mean and
deviation over all training values): images converted from raw pixels in one pass
(:func:`pixel_statistics`, :func:`pixels_to_float32`), float features in place
(:func:`standardize_in_place`). :mod:`gpubp.evaluate` states the same maps as a
:class:`Preprocessing` for a model that takes raw inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Preprocessing",
    "pixel_statistics",
    "pixels_to_float32",
    "standardize_in_place",
]


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


# --- images and feature arrays, as datasets load them --------------------------------------------

#: Pixels converted per chunk: the chunk's temporaries stay in cache, the output is written once.
_PIXEL_CHUNK = 1 << 18


def pixel_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of ``images / 255`` over all ``N`` values.

    For uint8 images exact: the sums ``S1 = sum x`` and ``S2 = sum x^2`` are integers (the
    squares taken in uint16, chunk by chunk, no float copy of the images), and
    ``mean = S1 / (255 N)``, ``var = (N S2 - S1^2) / (255 N)^2`` in Python's exact integers.
    Other dtypes are summed in float64 chunks.
    """
    flat = images.reshape(-1)
    n = flat.size
    if n == 0:
        return 0.0, 0.0
    if flat.dtype == np.uint8:
        s1 = int(flat.sum(dtype=np.uint64))
        s2 = 0
        sq = np.empty(min(n, _PIXEL_CHUNK), dtype=np.uint16)
        for start in range(0, n, _PIXEL_CHUNK):
            x = flat[start : start + _PIXEL_CHUNK]
            out = sq[: x.size]
            np.multiply(x, x, out=out, dtype=np.uint16)  # 255^2 < 2^16
            s2 += int(out.sum(dtype=np.uint64))
        return s1 / (255 * n), math.sqrt((n * s2 - s1 * s1) / (255 * n) ** 2)
    total = sum(
        float(flat[i : i + _PIXEL_CHUNK].sum(dtype=np.float64)) for i in range(0, n, _PIXEL_CHUNK)
    )
    mean = total / n / 255.0
    acc = 0.0
    for start in range(0, n, _PIXEL_CHUNK):
        d = flat[start : start + _PIXEL_CHUNK].astype(np.float64) / 255.0 - mean
        acc += float(d @ d)
    return mean, math.sqrt(acc / n)


def pixels_to_float32(images: np.ndarray, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """``(N, ...)`` images as float32 rows ``(N, d)``: ``(x / 255 - mean) / std``.

    Each step in float32, as ``x = x.astype(float32) / 255; x -= mean; x /= std`` would do it,
    so the values are the same bit for bit; but in one pass over the output: uint8 images
    through a 256-entry table of those values, other dtypes chunk by chunk.
    """
    n = images.shape[0]
    flat = images.reshape(-1)
    out = np.empty(flat.size, dtype=np.float32)
    m, s, scale = np.float32(mean), np.float32(std), np.float32(255.0)
    if flat.dtype == np.uint8:
        table = (np.arange(256, dtype=np.float32) / scale - m) / s
        for start in range(0, flat.size, _PIXEL_CHUNK):
            # mode="wrap" writes into out directly (uint8 indices are always in range)
            np.take(
                table,
                flat[start : start + _PIXEL_CHUNK],
                out=out[start : start + _PIXEL_CHUNK],
                mode="wrap",
            )
    else:
        for start in range(0, flat.size, _PIXEL_CHUNK):
            chunk = out[start : start + _PIXEL_CHUNK]
            chunk[...] = flat[start : start + _PIXEL_CHUNK]
            chunk /= scale
            chunk -= m
            chunk /= s
    return out.reshape(n, -1)


def standardize_in_place(train: np.ndarray, *others: np.ndarray) -> tuple[float, float]:
    """Standardise float32 features with one mean and deviation over all of ``train``.

    The statistics are taken in float64 over every value of ``train`` (a deviation of 0 counts
    as 1); ``train`` and each of ``others`` then become ``(x - mean) / std`` in place, each step
    in the arrays' float32. Returns ``(mean, std)``.
    """
    mean = float(train.mean(dtype=np.float64))
    std = float(train.std(dtype=np.float64)) or 1.0
    for x in (train, *others):
        x -= np.float32(mean)
        x /= np.float32(std)
    return mean, std
