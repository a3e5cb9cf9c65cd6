"""Argument checks shared by the Python API (``MLP``, ``TrainConfig``, ``gradflow``) and the
command line, so a number is judged by one rule wherever it comes in.

Each rule is a predicate (``positive_int``...) the CLI's argument types use, and a ``check_*``
function the API uses, which raises with the argument's name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(value: object) -> bool:
    """An int or NumPy integer, but not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def positive_int(value: object) -> bool:
    return is_int(value) and value >= 1  # type: ignore[operator]


def non_negative_int(value: object) -> bool:
    return is_int(value) and value >= 0  # type: ignore[operator]


def _real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def positive_number(value: object) -> bool:
    """A finite number > 0 (NaN and infinity refused)."""
    return _real(value) and math.isfinite(value) and value > 0  # type: ignore[arg-type,operator]


def non_negative_number(value: object) -> bool:
    return _real(value) and math.isfinite(value) and value >= 0  # type: ignore[arg-type,operator]


def fraction(value: object) -> bool:
    """A number in ``[0, 1)``."""
    return _real(value) and 0 <= value < 1  # type: ignore[operator]


def check_positive_int(name: str, value: object) -> int:
    if not positive_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def check_int(name: str, value: object, *, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_positive_number(name: str, value: object) -> float:
    if not positive_number(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_non_negative_number(name: str, value: object) -> float:
    if not non_negative_number(value):
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(name: str, value: object) -> float:
    if not fraction(value):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def printable(text: str, newlines: bool = False) -> str:
    """``text`` safe to print on a terminal: control and format characters (ANSI escapes,
    carriage returns, bidirectional overrides; newlines too unless ``newlines``) escaped as
    ``\\x1b``, ``\\u202e``..., so a string read from a file cannot fake or hide output."""
    import unicodedata

    return "".join(
        c
        if (c == "\n" and newlines) or unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp", "Cs")
        else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )
