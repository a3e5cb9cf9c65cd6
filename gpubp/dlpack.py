"""Arrays of other libraries in, through DLPack.

Anything that speaks DLPack (``__dlpack__`` and ``__dlpack_device__``: PyTorch tensors, JAX
arrays, CuPy arrays) is read without a copy where it already lives on the backend's device: on
the CPU backends (``numpy``, ``numba``) a CPU tensor becomes a NumPy view of the same memory
(:func:`numpy.from_dlpack`); on the ``cupy`` backend a CUDA tensor becomes a CuPy view
(:func:`cupy.from_dlpack`). Where the devices differ the values are copied, explicitly, through
the producer's own DLPack export: a CUDA tensor on a CPU backend is copied to the host, a CPU
tensor on the ``cupy`` backend to the GPU (as a NumPy array would be). A tensor that requires
grad is read through ``detach()`` (gpubp only reads it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backends import Backend

__all__ = ["from_dlpack", "is_dlpack"]

# DLPack device types (dlpack.h): where the memory of an exported array lives
_CPU_DEVICES = (1, 3)  # kDLCPU, kDLCUDAHost (pinned host memory)
_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def is_dlpack(value: Any) -> bool:
    """Whether ``value`` exports DLPack (and is not a NumPy array, read as it is)."""
    return (
        not isinstance(value, np.ndarray)
        and hasattr(value, "__dlpack__")
        and hasattr(value, "__dlpack_device__")
    )


def from_dlpack(backend: Backend, value: Any, argument: str) -> Any:
    """``value`` (a DLPack exporter) as an array of ``backend``: a view of the same memory when
    it lives on the backend's device, else a copy onto it."""
    if getattr(value, "requires_grad", False) and callable(getattr(value, "detach", None)):
        value = value.detach()  # gpubp reads the values; the autograd graph stays untouched
    try:
        device_type = int(value.__dlpack_device__()[0])
        on_cpu = device_type in _CPU_DEVICES
        if backend.xp is np:  # the CPU backends
            return np.from_dlpack(value) if on_cpu else _host_copy(value)
        if device_type in _CUDA_DEVICES and hasattr(backend.xp, "from_dlpack"):
            return backend.xp.from_dlpack(value)  # the GPU backend, same device: no copy
        return backend.asarray(np.from_dlpack(value) if on_cpu else _host_copy(value))
    except (BufferError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise TypeError(
            f"{argument} ({type(value).__module__}.{type(value).__name__}) could not be read "
            f"through DLPack ({exc}); convert it to a NumPy array first"
        ) from None


def _host_copy(value: Any) -> np.ndarray:
    """A host copy of a device array, asked of the producer through DLPack (``dl_device``) or,
    for producers that predate it, its own ``cpu()`` (PyTorch) or ``get()`` (CuPy)."""
    try:
        return np.from_dlpack(value, device="cpu", copy=True)
    except (BufferError, TypeError, ValueError, RuntimeError, NotImplementedError):
        pass
    for method in ("cpu", "get"):
        fetch = getattr(value, method, None)
        if callable(fetch):
            host = fetch()
            return np.from_dlpack(host) if is_dlpack(host) else np.asarray(host)
    return np.asarray(value)
