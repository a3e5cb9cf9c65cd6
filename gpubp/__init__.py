"""gpubp: backpropagation for fully connected networks on NumPy, Numba and CUDA.

Pick a backend with one word (``numpy``, ``numba``, ``cupy``, ``auto``); every backend is
checked against the float64 reference in :mod:`gpubp.reference`.
"""

from __future__ import annotations

from . import optim, reference
from .backends import available_backends, backend_status, get_backend, to_numpy, use_backend
from .errors import BackendUnavailableError, ModelFileError, NonFiniteLossError
from .model import MLP

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "BackendUnavailableError",
    "ModelFileError",
    "NonFiniteLossError",
    "__version__",
    "available_backends",
    "backend_status",
    "get_backend",
    "optim",
    "reference",
    "to_numpy",
    "use_backend",
]
