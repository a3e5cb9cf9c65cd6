"""gpubp: backpropagation for fully connected networks on NumPy, Numba and CUDA.

Pick a backend with one word (``numpy``, ``numba``, ``cupy``, ``auto``); every backend is
checked against the float64 reference in :mod:`gpubp.reference`.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import optim, reference
from .backends import available_backends, backend_status, get_backend, to_numpy, use_backend
from .errors import (
    BackendUnavailableError,
    ModelFileError,
    NonFiniteLossError,
    NoPreprocessingWarning,
)
from .model import MLP
from .preprocessing import Preprocessing

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "BackendUnavailableError",
    "ModelFileError",
    "NoPreprocessingWarning",
    "NonFiniteLossError",
    "Preprocessing",
    "__version__",
    "available_backends",
    "backend_status",
    "get_backend",
    "optim",
    "reference",
    "to_numpy",
    "use_backend",
]

#: Submodules loaded on first use, so ``import gpubp; gpubp.train.train(...)`` works without
#: making every ``import gpubp`` pay for the training and plotting code.
_LAZY = (
    "train",
    "evaluate",
    "gradflow",
    "loop",
    "modelfile",
    "checkpoint",
    "datasets",
    "plots",
    "cli",
    "interop",
    "sklearn",
)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
