"""Checks of the estimators' parameters and of ``sample_weight``, worded for their users."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not is_bool(value)


def dtype_name(value: Any) -> str | None:
    try:
        return np.dtype(value).name
    except TypeError:
        return None


def fail(name: str, value: object, expected: str) -> ValueError:
    return ValueError(f"{name} must be {expected}; got {value!r}")


def check_sample_weight(sample_weight: Any, X: np.ndarray) -> np.ndarray:
    """``sample_weight`` as a float ``(n_samples,)`` array of ``X``'s dtype (a number: the same
    weight for every sample)."""
    n = X.shape[0]
    if isinstance(sample_weight, numbers.Number):
        return np.full(n, sample_weight, dtype=X.dtype)
    try:
        sw = np.asarray(sample_weight, dtype=X.dtype)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sample_weight must be an array of numbers; {exc}") from None
    if sw.ndim != 1:
        raise ValueError(
            f"Sample weights must be 1D array or scalar; sample_weight has shape {sw.shape}"
        )
    if sw.shape != (n,):
        raise ValueError(
            f"sample_weight.shape == {sw.shape}, expected {(n,)}: one weight per row of X"
        )
    if not np.isfinite(sw).all():
        raise ValueError("sample_weight contains NaN or infinity; pass finite weights")
    if n and not sw.any():
        raise ValueError(
            "Sample weights must contain at least one non-zero number; every sample_weight is 0"
        )
    return sw
