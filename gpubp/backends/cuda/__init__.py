"""The CUDA backend: ops on CuPy arrays, gpubp's own kernels and cuBLAS binding, a graph step.

Modules, one concern each (none imports CuPy or needs a GPU at import time):

- :mod:`.backend`: :class:`CupyBackend` (the ops) and :class:`DeviceLoss`; ``import_cupy``;
- :mod:`.catalogue`: the kernel sources, every instantiation by name, launch plans, tables and
  the hyper-parameter block;
- :mod:`.launch`: one public wrapper per kernel family that checks its arrays and launches;
- :mod:`.cublas`: the ctypes cuBLAS binding (own handle, device pointer mode, workspace);
- :mod:`.graph`: the train step's buffers and the step captured as a CUDA graph;
- :mod:`.memory`: the step's memory estimate and the out-of-memory error;
- :mod:`.nvrtc`: NVRTC through ctypes, for compiling every kernel in CI without a GPU.
"""

from __future__ import annotations

from .backend import CupyBackend, DeviceLoss

__all__ = ["CupyBackend", "DeviceLoss"]
