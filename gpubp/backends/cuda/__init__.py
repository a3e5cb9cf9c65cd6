"""The CUDA backend: ops on CuPy arrays, gpubp's own kernels and cuBLAS binding, a graph step.

Modules, one concern each (none imports CuPy or needs a GPU at import time), from the bottom up:

- :mod:`.cupy_module`: which cupy module is used: ``cupy``, or the stand-in ``GPUBP_CUPY_MODULE``
  names (``import_cupy``);
- :mod:`.catalogue`: the kernel sources, every instantiation by name, launch plans, tables and
  the hyper-parameter block;
- :mod:`.launch`: one public wrapper per kernel family that checks its arrays and launches;
- :mod:`.bias`: every layer's bias gradient of a train step in two launches, from a layer table;
- :mod:`.scalars`: the checked wrappers of the step's one-thread scalar kernels (a schedule's
  rate, Adam's step scalars, the step counter) and :class:`~.scalars.StepScalars`, the
  hyper-parameter block and the device state it is computed from;
- :mod:`.cublas`: the ctypes cuBLAS binding (own handle, device pointer mode, workspace);
- :mod:`.context`: the device context the ops and the graph step share: the cupy module, per
  device its kernels, status words, GEMM constants and host ring; cuBLAS handles and the GEMM;
- :mod:`.status`: the status protocol: device errors raised at the next synchronisation, and
  :class:`DeviceLoss`;
- :mod:`.graph`: the train step's buffers and the step recorded once as a CUDA graph;
- :mod:`.steps`: the train steps kept per batch shape (least recently used dropped);
- :mod:`.inputs`: the batch gathers' buffers a train step reads in place of its own input
  buffers;
- :mod:`.sparse`: the first layer on sparse input (the CSR kernel and its ops, a mixin);
- :mod:`.update`: the table updates outside the graph step, the data-parallel one in no read of
  its own (a mixin);
- :mod:`.backend`: :class:`CupyBackend`, the ops;
- :mod:`.memory`: the step's memory estimate and the out-of-memory error;
- :mod:`.nvrtc`: NVRTC through ctypes, for compiling every kernel in CI without a GPU.
"""

from __future__ import annotations

from .backend import CupyBackend
from .status import DeviceLoss

__all__ = ["CupyBackend", "DeviceLoss"]
