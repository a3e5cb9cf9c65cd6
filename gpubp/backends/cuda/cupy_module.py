"""Which cupy module the CUDA backend uses: ``cupy``, or a stand-in named by ``GPUBP_CUPY_MODULE``.

The injection point for code that checks the GPU path without a GPU: a module that behaves like
``cupy`` (arrays, ``cuda`` streams and graphs, ``RawModule``; optionally ``libcublas()``, see
:class:`gpubp.backends.cuda.cublas.Cublas`) is imported in its place. The variable reaches
child processes too (``gpubp train``, ``mpirun``), where an argument could not.
``CupyBackend(cupy=module)`` injects one module into one backend instead.

The registry never lets ``auto`` pick a stand-in (:func:`injected`): it names it only when asked
for ``cupy``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

#: The environment variable naming the module imported in place of ``cupy``.
CUPY_MODULE_ENV = "GPUBP_CUPY_MODULE"


def cupy_module_name() -> str:
    """The name of the module the backend imports as cupy: ``$GPUBP_CUPY_MODULE`` or ``cupy``."""
    return os.environ.get(CUPY_MODULE_ENV) or "cupy"


def injected() -> bool:
    """Whether a stand-in module replaces ``cupy`` (``GPUBP_CUPY_MODULE`` names another)."""
    return cupy_module_name() != "cupy"


def import_cupy() -> Any:
    """The cupy module the backend uses: ``cupy``, or the module ``GPUBP_CUPY_MODULE`` names.

    The one place the CUDA backend imports CuPy. Raises :class:`ImportError` if it cannot be
    imported.
    """
    return importlib.import_module(cupy_module_name())
