"""Backend registry: one word picks the backend, ``auto`` picks the best that runs here."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._checks import positive_int
from ..errors import BackendUnavailableError
from .base import OPS, Backend
from .cuda import CupyBackend
from .cuda.cublas import library_for
from .cuda.cupy_module import CUPY_MODULE_ENV, cupy_module_name, import_cupy, injected
from .numpy_backend import NumpyBackend

__all__ = [
    "BACKEND_NAMES",
    "EMULATED",
    "EMULATOR_HINT",
    "OPS",
    "Backend",
    "auto_order",
    "available_backends",
    "backend_label",
    "backend_status",
    "get_backend",
    "to_numpy",
    "use_backend",
]

#: Every name ``get_backend`` understands, best first (``auto`` picks the first that runs).
BACKEND_NAMES: tuple[str, ...] = ("cupy", "numba", "numpy")

_instances: dict[str, Backend] = {}
_threaded: dict[tuple[str, int], Backend] = {}  # get_backend(name, threads=n)
_context: list[Backend] = []  # backends set by use_backend, innermost last


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


#: what a run on a stand-in for CuPy says of it (the CPU emulation of ``cudaemu/``)
EMULATED = "emulated GPU: correctness only, not speed"
#: how to run the CUDA backend without a GPU, for ``gpubp info`` and a refused ``--backend cupy``
EMULATOR_HINT = (
    "without a GPU, a checkout of gpubp runs the CUDA kernels on an emulated GPU (needs g++): "
    f"{CUPY_MODULE_ENV}=cudaemu.cupy with --backend cupy; correctness only, not speed"
)


def auto_order() -> list[str]:
    """The backend names in the order ``auto`` considers them: :data:`BACKEND_NAMES`, with a
    stand-in for CuPy (which ``auto`` never picks) last."""
    if not injected():
        return list(BACKEND_NAMES)
    return [n for n in BACKEND_NAMES if n != "cupy"] + ["cupy"]


def backend_label(backend: Backend) -> str:
    """``backend``'s name as a run reports it: ``cupy (emulated GPU: ...)`` on a stand-in."""
    xp = getattr(backend, "xp", None)
    if backend.name == "cupy" and getattr(xp, "__name__", "cupy").split(".")[0] != "cupy":
        return f"cupy ({EMULATED})"
    return backend.name


def get_backend(name: str | Backend | None = None, *, threads: int | None = None) -> Backend:
    """The backend called ``name`` (``numpy``, ``numba``, ``cupy`` or ``auto``).

    ``auto`` (and ``None``) is the backend chosen by the innermost :func:`use_backend` block if
    there is one, else the best that can run here: CuPy with a working GPU, else Numba, else
    NumPy (never a stand-in for CuPy named by ``GPUBP_CUPY_MODULE``). A backend object is returned
    as it is. Raises :class:`~gpubp.errors.BackendUnavailableError` if the backend cannot run
    here, saying why and what to use instead; :class:`ValueError` for an unknown name.

    Inside ``use_backend(be)``, ``auto`` and ``be``'s own name give ``be`` itself.

    ``threads``: a backend of its own that uses this many threads, for backends whose class
    takes a thread count (numba: BLAS's threads and its row split); :class:`ValueError` for
    one that takes none (numpy, whose GEMMs run on NumPy's BLAS at its own setting; cupy) or
    for a count that is not a positive int. ``None`` (default): the shared instance.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = "auto"
    if not isinstance(name, str) or name not in (*BACKEND_NAMES, "auto"):
        raise ValueError(
            f"backend={name!r} is not known; expected one of auto, {', '.join(BACKEND_NAMES)}"
        )
    if threads is None:
        for chosen in reversed(_context):
            if name in ("auto", chosen.name):
                return chosen
    if name == "auto":
        name = _context[-1].name if _context else _best()
    if threads is not None:
        return _with_threads(name, threads)
    if name not in _instances:
        why = _STATUS[name]()
        if why is not None:
            others = [n for n in available_backends() if n != name]
            raise BackendUnavailableError(name, why, others)
        _instances[name] = _CLASSES[name]()
    return _instances[name]


def _with_threads(name: str, threads: int) -> Backend:
    """The backend ``name`` built with ``threads=threads`` (one instance per pair)."""
    if not positive_int(threads):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    key = (name, int(threads))
    if key not in _threaded:
        cls = _CLASSES.get(name) or get_backend(name).__class__  # numba's class loads lazily
        if "threads" not in inspect.signature(cls).parameters:
            where = "it runs on the GPU" if name == "cupy" else "its GEMMs use NumPy's BLAS as set"
            raise ValueError(
                f"the {name} backend takes no thread count (threads={threads}): {where}; "
                "the numba backend takes one"
            )
        _threaded[key] = cls(threads=int(threads))  # type: ignore[call-arg]
    return _threaded[key]


@contextlib.contextmanager
def use_backend(name: str | Backend) -> Iterator[Backend]:
    """Context manager: inside it, ``backend="auto"`` (the default everywhere) means ``name``,
    and a backend object given here is what its own name means too (so
    ``use_backend(get_backend("numba", threads=2))`` reaches code that names ``numba``).

    >>> with use_backend("numpy") as be:
    ...     be.name
    'numpy'
    """
    backend = get_backend(name)
    _context.append(backend)
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
