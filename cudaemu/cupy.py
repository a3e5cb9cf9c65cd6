"""An emulated CuPy whose device memory is host memory: enough of ``cupy`` for gpubp, and strict.

Arrays (:class:`ndarray`) wrap a NumPy array in 256-byte aligned host memory, so ``.data.ptr`` is
a real address that the CPU kernel emulator (:mod:`cudaemu.kernels`), the
emulated cuBLAS (:func:`libcublas`) and ``cuda.runtime.memcpyAsync`` read and write.
Every operation runs synchronously when it is called, except on a stream that is capturing:
kernel launches (:class:`RawModule` functions), ``cublasGemmEx`` through
:func:`libcublas` (on the stream set on the handle), ``runtime.memcpyAsync`` /
``MemoryPointer.copy_from_host_async`` and NCCL collectives are then *recorded* into the
:class:`cuda.Graph` that ``end_capture()`` returns, and run each time it is launched.

Strict where a GPU would fail or a real CuPy would refuse:

- ``np.asarray(device_array)`` raises ``TypeError`` as CuPy does (a hidden host sync); device
  arrays never mix with NumPy arrays in operators or functions (``TypeError``);
- while a stream captures, anything a CUDA graph cannot hold (an elementwise op, ``fill``, an
  assignment, an allocation, ``get()``/``float()``, a synchronize, a compile) raises
  :class:`StreamCaptureError` and invalidates the capture (``end_capture`` then raises);
- ``cuda.cublas`` (CuPy's own wrappers) raises ``NotImplementedError`` during capture, as CuPy
  13.6 to 14.2 do;
- the emulated ``cublasGemmEx`` checks every argument (status 7 for a bad one) and raises
  :class:`UndefinedBehaviour` for memory outside any live allocation, misaligned or overlapping
  operands; a graph replay that reaches freed memory raises too;
- ``empty()`` memory is filled with 0xFF bytes (NaN for floats, -1 for ints), so reading a buffer
  before writing it shows.

Counters for tests: :data:`stats` (``get``: device-to-host reads that synchronise, ``h2d``,
``alloc``, ``launch``, ``captured_launch``, ``eager_launch``, ``gemm``, ``captured_gemm``,
``eager_gemm``, ``memcpy``, ``graph_launch``, ``sync``, ``allreduce``; ``launch`` and ``gemm``
count every execution, replays included, ``eager_*`` those run outside a graph) and
:data:`launches` (per kernel name); both cleared by :func:`reset_stats`.

The emulator is split by concern; this module is the ``cupy`` namespace itself (what
``import_cupy()`` returns and :func:`install` puts in ``sys.modules``) and re-exports the rest:
:mod:`._common` (counters, errors, the current device), :mod:`._stream` (streams, events,
capture, graphs), :mod:`._memory` (allocations, pinned memory, copies), :mod:`._device`,
:mod:`._array` (``ndarray`` and the array functions), :mod:`._rawmodule` (kernel launches),
:mod:`._cublas` and :mod:`._nccl`. Each piece of module-level state lives in one of them only.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from ._array import (
    _function,
    _Namespace,
    arange,
    array,
    asarray,
    ascontiguousarray,
    asnumpy,
    empty,
    empty_like,
    full,
    full_like,
    ndarray,
    ones,
    ones_like,
    zeros,
    zeros_like,
)
from ._common import (
    _N_DEVICES,
    CUDADriverError,
    CUDARuntimeError,
    OutOfMemoryError,
    StreamCaptureError,
    UndefinedBehaviour,
    _device_id,
    launches,
    reset_stats,
    stats,
)
from ._cublas import (
    CUBLASError,
    EmulatedLibCublas,
    _cupy_cublas,
    _get_cublas_handle,
    libcublas,
)
from ._device import Device, _device_properties, is_available
from ._memory import (
    _D2D,
    _D2H,
    _DEFAULT,
    _H2D,
    _H2H,
    ALIGN,
    MemoryPointer,
    PinnedMemoryPointer,
    _addr,
    _mem_get_info,
    _memcpy,
    alloc_pinned_memory,
    get_default_memory_pool,
    get_default_pinned_memory_pool,
    set_device_memory,
)
from ._nccl import NcclCommunicator, NcclError, _cupy_nccl
from ._rawmodule import RawFunction, RawKernel, RawModule
from ._stream import (
    Event,
    ExternalStream,
    Graph,
    Stream,
    _capturing,
    _stream_of,
    get_current_stream,
    get_elapsed_time,
)

__all__ = [
    "ALIGN",
    "CUBLASError",
    "CUDADriverError",
    "CUDARuntimeError",
    "Device",
    "EmulatedLibCublas",
    "Event",
    "ExternalStream",
    "Graph",
    "MemoryPointer",
    "NcclCommunicator",
    "NcclError",
    "OutOfMemoryError",
    "PinnedMemoryPointer",
    "RawFunction",
    "RawKernel",
    "RawModule",
    "Stream",
    "StreamCaptureError",
    "UndefinedBehaviour",
    "__version__",
    "_capturing",
    "alloc_pinned_memory",
    "arange",
    "array",
    "asarray",
    "ascontiguousarray",
    "asnumpy",
    "cuda",
    "empty",
    "empty_like",
    "emulated",
    "full",
    "full_like",
    "get_array_module",
    "get_current_stream",
    "get_default_memory_pool",
    "get_default_pinned_memory_pool",
    "get_elapsed_time",
    "install",
    "is_available",
    "launches",
    "libcublas",
    "ndarray",
    "ones",
    "ones_like",
    "reset_stats",
    "set_device_memory",
    "stats",
    "zeros",
    "zeros_like",
]

__version__ = "14.0.0+emulated"
#: True: this is the CPU emulator, not CuPy.
emulated = True


def get_array_module(*args: Any) -> Any:
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name: str) -> Any:
    """Any other NumPy name: dtypes and constants as they are, functions wrapped for the device."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        obj = getattr(np, name)
    except AttributeError:
        raise AttributeError(f"emulated cupy has no attribute {name!r}") from None
    if isinstance(obj, (type, int, float, np.dtype)) or obj is None:
        return obj
    if isinstance(obj, types.ModuleType):
        return _Namespace(obj, name)
    if callable(obj):
        # cached aside, never in globals(): "sum", "any", "max" ... would shadow the builtins
        # this module itself uses
        fn = _wrapped.get(name)
        if fn is None:
            fn = _wrapped[name] = _function(obj, name)
        return fn
    return obj


_wrapped: dict[str, Callable[..., Any]] = {}


# --- the cuda namespace ---------------------------------------------------------------------------


def _make_cuda() -> types.ModuleType:
    cuda = types.ModuleType("cupy.cuda", "The emulated cupy.cuda namespace.")
    runtime = types.ModuleType("cupy.cuda.runtime")
    for name, value in {
        "CUDARuntimeError": CUDARuntimeError,
        "is_hip": False,
        "memcpyAsync": lambda dst, src, size, kind, stream: _memcpy(
            _addr(dst), _addr(src), int(size), int(kind), _stream_of(stream), "memcpyAsync"
        ),
        "memGetInfo": _mem_get_info,
        "getDeviceCount": lambda: _N_DEVICES,
        "getDevice": lambda: _device_id[0],
        "setDevice": lambda d: Device(d).use(),
        "getDeviceProperties": _device_properties,
        "deviceSynchronize": lambda: Device().synchronize(),
        "runtimeGetVersion": lambda: 12080,
        "driverGetVersion": lambda: 12080,
        "memcpyHostToHost": _H2H,
        "memcpyHostToDevice": _H2D,
        "memcpyDeviceToHost": _D2H,
        "memcpyDeviceToDevice": _D2D,
        "memcpyDefault": _DEFAULT,
    }.items():
        setattr(runtime, name, value)
    memory = types.ModuleType("cupy.cuda.memory")
    memory.OutOfMemoryError = OutOfMemoryError  # type: ignore[attr-defined]
    memory.MemoryPointer = MemoryPointer  # type: ignore[attr-defined]
    memory.alloc = lambda n: empty(int(n), np.uint8).data  # type: ignore[attr-defined]
    driver = types.ModuleType("cupy.cuda.driver")
    driver.CUDADriverError = CUDADriverError  # type: ignore[attr-defined]
    driver.get_build_version = lambda: 12080  # type: ignore[attr-defined]
    nvrtc = types.ModuleType("cupy.cuda.nvrtc")
    nvrtc.getVersion = lambda: (12, 8)  # type: ignore[attr-defined]
    device = types.ModuleType("cupy.cuda.device")
    device.Device = Device  # type: ignore[attr-defined]
    device.get_cublas_handle = _get_cublas_handle  # type: ignore[attr-defined]
    device.get_device_id = lambda: _device_id[0]  # type: ignore[attr-defined]
    stream = types.ModuleType("cupy.cuda.stream")
    graph = types.ModuleType("cupy.cuda.graph")
    graph.Graph = Graph  # type: ignore[attr-defined]
    for name, value in {
        "Stream": Stream,
        "ExternalStream": ExternalStream,
        "Event": Event,
        "get_current_stream": get_current_stream,
        "get_elapsed_time": get_elapsed_time,
    }.items():
        setattr(stream, name, value)
        setattr(cuda, name, value)
    for name, value in {
        "is_available": is_available,
        "Device": Device,
        "Graph": Graph,
        "alloc_pinned_memory": alloc_pinned_memory,
        "PinnedMemoryPointer": PinnedMemoryPointer,
        "MemoryPointer": MemoryPointer,
        "runtime": runtime,
        "memory": memory,
        "driver": driver,
        "nvrtc": nvrtc,
        "device": device,
        "stream": stream,
        "graph": graph,
        "cublas": _cupy_cublas(),
        "nccl": _cupy_nccl(),
        "nccl_enabled": True,
        "cudnn_enabled": False,
    }.items():
        setattr(cuda, name, value)
    return cuda


cuda = _make_cuda()


def install() -> None:
    """Make ``import cupy`` (and ``cupy.cuda.*``, ``cupy_backends.cuda.libs.cublas``) this module.

    For code that imports CuPy by name (``gpubp.distributed``, ``gpubp.cli``): call it before
    that code runs, in a process meant to use the emulator only.
    """
    me = sys.modules[__name__]
    sys.modules["cupy"] = me
    sys.modules["cupy.cuda"] = cuda
    for sub in ("runtime", "memory", "driver", "nvrtc", "device", "stream", "graph", "cublas"):
        sys.modules[f"cupy.cuda.{sub}"] = getattr(cuda, sub)
    sys.modules["cupy.cuda.nccl"] = cuda.nccl
    backends = types.ModuleType("cupy_backends")
    backends.cuda = types.ModuleType("cupy_backends.cuda")  # type: ignore[attr-defined]
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cuda.cublas  # type: ignore[attr-defined]
    backends.cuda.libs = libs
    sys.modules["cupy_backends"] = backends
    sys.modules["cupy_backends.cuda"] = backends.cuda
    sys.modules["cupy_backends.cuda.libs"] = libs
    sys.modules["cupy_backends.cuda.libs.cublas"] = cuda.cublas
