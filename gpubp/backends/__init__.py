"""Backend registry: one word picks the backend, ``auto`` picks the best that runs here."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import BackendUnavailableError
from .base import OPS, Backend
from .cuda import CupyBackend
from .cuda.cublas import library_for
from .cuda.cupy_module import CUPY_MODULE_ENV, cupy_module_name, import_cupy, injected
from .numpy_backend import NumpyBackend

__all__ = [
    "BACKEND_NAMES",
    "OPS",
    "Backend",
    "available_backends",
    "backend_status",
    "get_backend",
    "to_numpy",
    "use_backend",
]

#: Every name ``get_backend`` understands, best first (``auto`` picks the first that runs).
BACKEND_NAMES: tuple[str, ...] = ("cupy", "numba", "numpy")

_instances: dict[str, Backend] = {}
_context: list[str] = []  # names set by use_backend, innermost last


def _numpy_status() -> str | None:
    return None


def _numba_status() -> str | None:
    if importlib.util.find_spec("numba") is None:
        return "Numba is not installed (pip install 'gpubp[numba]')"
    try:
        _numba_class()
    except Exception as exc:  # a broken Numba/llvmlite install: report it, never crash
        return f"Numba is installed but could not be imported: {type(exc).__name__}: {exc}"
    return None


def _numba_class() -> type[Backend]:
    # imported on first use: importing Numba costs a few hundred milliseconds
    from .numba import NumbaBackend

    _CLASSES["numba"] = NumbaBackend
    return NumbaBackend


def _cupy_status() -> str | None:
    name = cupy_module_name()
    # a stand-in (GPUBP_CUPY_MODULE) is named in every reason, so its user knows what ran
    what = f"{CUPY_MODULE_ENV}={name}" if injected() else "CuPy"
    if not injected() and importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'gpubp[cuda12]' or 'gpubp[cuda13]')"
    try:
        cupy = import_cupy()
    except ImportError as exc:
        if injected():
            return f"{what}, but that module cannot be imported ({type(exc).__name__}: {exc})"
        return f"CuPy could not be imported: {type(exc).__name__}: {exc}"
    try:
        if not cupy.cuda.is_available():
            return (
                f"{what} is installed but no CUDA GPU is visible "
                f"({name}.cuda.is_available() is False)"
            )
    except Exception as exc:  # a broken driver or toolkit: report it, never crash the registry
        return f"{what} could not reach a GPU: {type(exc).__name__}: {exc}"
    try:  # the backend needs cuBLAS (its own binding) and NVRTC (which CuPy loads on demand)
        library_for(cupy)
        cupy.cuda.nvrtc.getVersion()
    except Exception as exc:
        return (
            f"{what} sees a GPU but cannot load cuBLAS or NVRTC ({type(exc).__name__}: {exc}); "
            "install the CUDA libraries with pip install 'cupy-cuda13x[ctk]' (or cupy-cuda12x)"
        )
    return None


_STATUS = {"numpy": _numpy_status, "numba": _numba_status, "cupy": _cupy_status}
_CLASSES: dict[str, type[Backend]] = {"numpy": NumpyBackend, "cupy": CupyBackend}


def backend_status() -> dict[str, str | None]:
    """For each backend name, ``None`` if it can run here, else the reason it cannot."""
    return {name: _STATUS[name]() for name in BACKEND_NAMES}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, best first."""
    return [name for name, why in backend_status().items() if why is None]


def _best() -> str:
    """What ``auto`` takes: the first available backend, except a stand-in for CuPy
    (``GPUBP_CUPY_MODULE``: a module checking the GPU code, such as a CPU emulation, far slower
    than numba or numpy; name ``cupy`` to use it)."""
    return next(n for n in available_backends() if not (n == "cupy" and injected()))


def get_backend(name: str | Backend | None = None) -> Backend:
    """The backend called ``name`` (``numpy``, ``numba``, ``cupy`` or ``auto``).

    ``auto`` (and ``None``) is the backend chosen by the innermost :func:`use_backend` block if
    there is one, else the best that can run here: CuPy with a working GPU, else Numba, else
    NumPy (never a stand-in for CuPy named by ``GPUBP_CUPY_MODULE``). A backend object is returned
    as it is. Raises :class:`~gpubp.errors.BackendUnavailableError` if the backend cannot run
    here, saying why and what to use instead; :class:`ValueError` for an unknown name.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = "auto"
    if not isinstance(name, str) or name not in (*BACKEND_NAMES, "auto"):
        raise ValueError(
            f"backend={name!r} is not known; expected one of auto, {', '.join(BACKEND_NAMES)}"
        )
    if name == "auto":
        name = _context[-1] if _context else _best()
    if name not in _instances:
        why = _STATUS[name]()
        if why is not None:
            others = [n for n in available_backends() if n != name]
            raise BackendUnavailableError(
                f"backend={name!r} cannot run here: {why}. Available now: "
                f"{', '.join(others)}; pass backend='auto' to take the best of them"
            )
        _instances[name] = _CLASSES[name]()
    return _instances[name]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Context manager: inside it, ``backend="auto"`` (the default everywhere) means ``name``.

    >>> with use_backend("numpy") as be:
    ...     be.name
    'numpy'
    """
    backend = get_backend(name)
    _context.append(backend.name)
    try:
        yield backend
    finally:
        _context.pop()


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy array with the values of ``array`` (a NumPy array, a list, or a GPU array).

    For an array of the cupy backend this is a synchronisation point of that backend: a NaN met
    by a queued train step raises :class:`~gpubp.errors.NonFiniteLossError` here.
    """
    if isinstance(array, np.ndarray):
        return array
    cupy_backend = _instances.get("cupy")
    if cupy_backend is not None and isinstance(array, cupy_backend.xp.ndarray):
        return cupy_backend.to_numpy(array)  # deferred train-step errors surface here
    get = getattr(array, "get", None)  # cupy.ndarray.get() copies device -> host
    if callable(get) and hasattr(array, "__cuda_array_interface__"):
        return np.asarray(get())
    return np.asarray(array)
