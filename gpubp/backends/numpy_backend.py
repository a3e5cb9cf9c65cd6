"""The NumPy backend: float32 and float64, vectorised, into preallocated buffers.

Everything is inherited from :class:`~gpubp.backends.base.Backend` written against ``numpy``;
GEMMs go to the BLAS NumPy was built with, and every elementwise stage writes in place, so a
steady-state train step allocates no new arrays.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    """Vectorised NumPy on the CPU; always available."""

    name: ClassVar[str] = "numpy"
    xp = np
