"""An emulated CuPy whose device memory is host memory: enough of ``cupy`` for gpubp, and strict.

Arrays (:class:`ndarray`) wrap a NumPy array in 256-byte aligned host memory, so ``.data.ptr`` is
a real address that the CPU kernel emulator (:mod:`gpubp.backends.cuda.emu.kernels`), the
emulated cuBLAS (:func:`emulated_libcublas`) and ``cuda.runtime.memcpyAsync`` read and write.
Every operation runs synchronously when it is called, except on a stream that is capturing:
kernel launches (:class:`RawModule` functions), ``cublasGemmEx`` through
:func:`emulated_libcublas` (on the stream set on the handle), ``runtime.memcpyAsync`` /
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
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import functools
import importlib
import itertools
import math
import os
import sys
import time
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np

__version__ = "14.0.0+emulated"
#: True: this is the CPU emulator, not CuPy.
emulated = True

# --- counters -------------------------------------------------------------------------------------

#: Event counts since :func:`reset_stats` (see the module docstring for the keys).
stats: collections.Counter[str] = collections.Counter()
#: Kernel executions per kernel name (eager launches and graph replays).
launches: collections.Counter[str] = collections.Counter()


def reset_stats() -> None:
    stats.clear()
    launches.clear()


# --- errors ---------------------------------------------------------------------------------------


class CUDARuntimeError(RuntimeError):
    """Stands in for ``cupy.cuda.runtime.CUDARuntimeError``."""


class CUDADriverError(RuntimeError):
    """Stands in for ``cupy.cuda.driver.CUDADriverError``."""


class StreamCaptureError(CUDARuntimeError):
    """Something a CUDA graph cannot hold was done while a stream was capturing."""


class UndefinedBehaviour(RuntimeError):
    """What a GPU would do undefined things with (out-of-bounds, misaligned, overlapping)."""


class OutOfMemoryError(MemoryError):
    """Stands in for ``cupy.cuda.memory.OutOfMemoryError``."""

    def __init__(self, size: int, total: int, limit: int = 0) -> None:
        super().__init__(
            f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
            + (f", limit set to: {limit:,} bytes" if limit else "")
            + ")."
        )


class CUBLASError(RuntimeError):
    """Stands in for ``cupy_backends.cuda.libs.cublas.CUBLASError``."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"{_CUBLAS_STATUS.get(status, 'UNKNOWN')} (status {status})")


class NcclError(RuntimeError):
    """Stands in for ``cupy.cuda.nccl.NcclError``."""


# --- device memory --------------------------------------------------------------------------------

#: Alignment of every allocation (CuPy's pool hands out 512-byte aligned blocks; 256 is what
#: cudaMalloc promises and what any kernel may assume).
ALIGN = 256
_DEVICE_BYTES = int(os.environ.get("GPUBP_EMU_DEVICE_BYTES", str(16 << 30)))


class _Allocations:
    """Live device allocations and pinned host buffers: address ranges, for bounds checks."""

    def __init__(self, limit: int) -> None:
        self.starts: list[int] = []
        self.info: dict[int, tuple[int, str]] = {}  # start -> (nbytes, "device" | "pinned")
        self.raws: dict[int, int] = {}  # id(raw numpy buffer) -> start
        self.used = 0
        self.limit = limit

    def add(self, start: int, nbytes: int, kind: str) -> None:
        bisect.insort(self.starts, start)
        self.info[start] = (nbytes, kind)
        if kind == "device":
            self.used += nbytes

    def remove(self, start: int, raw_id: int | None = None) -> None:
        nbytes, kind = self.info.pop(start)
        self.starts.pop(bisect.bisect_left(self.starts, start))
        if raw_id is not None:
            self.raws.pop(raw_id, None)
        if kind == "device":
            self.used -= nbytes

    def find(self, ptr: int, nbytes: int) -> str | None:
        """The kind of the allocation holding ``[ptr, ptr + nbytes)``, or None."""
        i = bisect.bisect_right(self.starts, ptr) - 1
        if i < 0:
            return None
        start = self.starts[i]
        size, kind = self.info[start]
        return kind if ptr + nbytes <= start + size else None


_mem = _Allocations(_DEVICE_BYTES)


def set_device_memory(nbytes: int) -> None:
    """Pretend the device has ``nbytes`` of memory (allocations beyond raise OutOfMemoryError)."""
    _mem.limit = int(nbytes)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _is_device(a: np.ndarray) -> bool:
    return id(_root(a)) in _mem.raws


def _alloc(shape: Any, dtype: Any, order: str = "C", fill: int | None = 0xFF) -> np.ndarray:
    """A new device buffer (``fill``: a byte pattern, or None to leave it as it comes)."""
    _guard("an allocation")
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    nbytes = math.prod(shape) * dtype.itemsize
    if _mem.used + nbytes > _mem.limit:
        raise OutOfMemoryError(nbytes, _mem.used, _mem.limit)
    raw = np.empty(nbytes + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    if fill is not None:
        raw.fill(fill)
    start = raw.ctypes.data + off
    _mem.add(start, nbytes, "device")
    _mem.raws[id(raw)] = start
    weakref.finalize(raw, _mem.remove, start, id(raw))
    stats["alloc"] += 1
    return np.ndarray(shape, dtype, buffer=raw, offset=off, order=order)  # type: ignore[arg-type]


def _to_device(host: np.ndarray) -> np.ndarray:
    order = "F" if host.flags.f_contiguous and not host.flags.c_contiguous else "C"
    out = _alloc(host.shape, host.dtype, order, fill=None)
    out[...] = host
    return out


def _check_range(ptr: int, nbytes: int, what: str, kinds: tuple[str, ...] = ("device",)) -> None:
    if nbytes <= 0:
        return
    kind = _mem.find(ptr, nbytes)
    if kind is None or kind not in kinds:
        raise UndefinedBehaviour(
            f"emulated CUDA: {what} [{ptr:#x}, +{nbytes}) is not inside one live "
            f"{' or '.join(kinds)} allocation (out of bounds, freed, or a host pointer)"
        )


# --- streams, capture and graphs ------------------------------------------------------------------


class _Op:
    """One node of a captured graph: what it is, and how to run it."""

    __slots__ = ("kind", "name", "run")

    def __init__(self, kind: str, name: str, run: Callable[[], None]) -> None:
        self.kind, self.name, self.run = kind, name, run

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name}>"


_capturing: list[Stream] = []  # at most one
_streams: dict[int, weakref.ref[Stream]] = {}
_stream_ptrs = itertools.count(0x5000_0000, 0x100)


def _guard(what: str) -> None:
    """Raise if a stream is capturing: ``what`` cannot go into a CUDA graph."""
    if _capturing:
        s = _capturing[0]
        s._invalidate(what)
        raise StreamCaptureError(
            f"emulated CUDA: {what} during stream capture (stream {s.ptr:#x}); a CUDA graph holds "
            "only kernel launches, cuBLAS calls on the captured stream, memcpyAsync and NCCL "
            "collectives; do this before begin_capture() or after end_capture()"
        )


def _submit(stream: Stream, op: _Op) -> None:
    """Run ``op`` now, or record it if ``stream`` is capturing."""
    if stream._ops is not None:
        stream._ops.append(op)
        stats["captured_" + op.kind] += 1
        return
    if _capturing:
        _guard(f"{op.kind} {op.name} on stream {stream.ptr:#x} (not the capturing stream)")
    stats["eager_" + op.kind] += 1  # (a graph replay runs its ops without coming here)
    op.run()


class Stream:
    """Stands in for ``cupy.cuda.Stream``: ``with stream:`` makes it current."""

    null: ClassVar[Stream]

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.ptr: int = 0 if null else next(_stream_ptrs)
        self.non_blocking = non_blocking
        self._ops: list[_Op] | None = None
        self._invalid: str | None = None
        self._prev: list[Stream] = []
        _streams[self.ptr] = weakref.ref(self)

    def __repr__(self) -> str:
        return f"<emulated Stream {self.ptr:#x}>"

    def __enter__(self) -> Stream:
        self._prev.append(_current[0])
        _current[0] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _current[0] = self._prev.pop()

    def use(self) -> Stream:
        _current[0] = self
        return self

    def _invalidate(self, what: str) -> None:
        if self._invalid is None:
            self._invalid = what

    def begin_capture(self, mode: Any = None) -> None:
        if self.ptr == 0:
            raise CUDARuntimeError(
                "cudaErrorStreamCaptureUnsupported: the null stream cannot be captured"
            )
        if self._ops is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is already capturing")
        if _capturing:
            raise CUDARuntimeError("emulated CUDA: one capture at a time (another stream captures)")
        self._ops, self._invalid = [], None
        _capturing.append(self)

    def end_capture(self) -> Graph:
        if self._ops is None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        ops, self._ops = self._ops, None
        _capturing.remove(self)
        if self._invalid is not None:
            why, self._invalid = self._invalid, None
            raise CUDARuntimeError(
                f"cudaErrorStreamCaptureInvalidated: the capture was invalidated by {why}"
            )
        return Graph(ops)

    def is_capturing(self) -> bool:
        return self._ops is not None

    def synchronize(self) -> None:
        _guard("Stream.synchronize()")
        stats["sync"] += 1

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        """Everything is already done when it is called (no-op, legal during capture too)."""

    @property
    def done(self) -> bool:
        return True


Stream.null = Stream(null=True)
_current: list[Stream] = [Stream.null]


def ExternalStream(ptr: int) -> Stream:
    ref = _streams.get(int(ptr))
    s = ref() if ref is not None else None
    if s is None:
        raise CUDARuntimeError(f"cudaErrorInvalidResourceHandle: no stream {int(ptr):#x}")
    return s


def get_current_stream() -> Stream:
    return _current[0]


def _stream_of(ptr: Any) -> Stream:
    if isinstance(ptr, Stream):
        return ptr
    return ExternalStream(_int(ptr))


class Event:
    """Stands in for ``cupy.cuda.Event`` (work is done when queued, so it is always complete)."""

    def __init__(
        self, block: bool = False, disable_timing: bool = False, interprocess: bool = False
    ) -> None:
        self.disable_timing = disable_timing
        self.time: float | None = None

    def record(self, stream: Stream | None = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        _guard("Event.synchronize()")
        stats["sync"] += 1

    @property
    def done(self) -> bool:
        return True


def get_elapsed_time(start: Event, end: Event) -> float:
    if start.time is None or end.time is None or start.disable_timing or end.disable_timing:
        raise CUDARuntimeError("cudaErrorInvalidResourceHandle: event not recorded with timing")
    return (end.time - start.time) * 1e3


class Graph:
    """A captured sequence; :meth:`launch` replays it (``launches`` counts the replays)."""

    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops
        self.launches = 0
        self.uploaded = False

    @property
    def nodes(self) -> list[str]:
        """What was captured, in order: ``"launch <kernel>"``, ``"gemm ..."``, ``"memcpy ..."``."""
        return [f"{op.kind} {op.name}" for op in self.ops]

    def upload(self, stream: Stream | None = None) -> None:
        _guard("Graph.upload()")
        self.uploaded = True

    def _run(self) -> None:
        for op in self.ops:
            op.run()
        self.launches += 1
        stats["graph_launch"] += 1

    def launch(self, stream: Stream | None = None) -> None:
        s = get_current_stream() if stream is None else stream
        _submit(s, _Op("graph", f"of {len(self.ops)} nodes", self._run))


# --- device ---------------------------------------------------------------------------------------

_N_DEVICES = int(os.environ.get("GPUBP_EMU_DEVICES", "1"))
_device_id = [0]


class Device:
    """Stands in for ``cupy.cuda.Device`` (``GPUBP_EMU_DEVICES`` devices, default 1)."""

    def __init__(self, device: Any = None) -> None:
        self.id = _device_id[0] if device is None else int(device)
        if not 0 <= self.id < _N_DEVICES:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        self._prev: list[int] = []

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (emulated)>"

    def use(self) -> None:
        _device_id[0] = self.id

    def __enter__(self) -> Device:
        self._prev.append(_device_id[0])
        _device_id[0] = self.id
        return self

    def __exit__(self, *exc: Any) -> None:
        _device_id[0] = self._prev.pop()

    def synchronize(self) -> None:
        _guard("Device.synchronize()")
        stats["sync"] += 1

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self) -> tuple[int, int]:
        return _mem_get_info()

    @property
    def cublas_handle(self) -> int:
        return _get_cublas_handle()


def is_available() -> bool:
    return True


def _mem_get_info() -> tuple[int, int]:
    return max(0, _mem.limit - _mem.used), _mem.limit


class PinnedMemoryPointer(bytearray):
    """Page-locked host memory: ``.ptr`` and the buffer protocol (a fixed-size bytearray)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(int(nbytes))
        # the exported view pins the bytearray's buffer: it can no longer be resized or moved
        self._lock = (ctypes.c_char * max(1, len(self))).from_buffer(self) if len(self) else None
        self.ptr: int = ctypes.addressof(self._lock) if self._lock is not None else 0
        if self.ptr:
            _mem.add(self.ptr, len(self), "pinned")
            weakref.finalize(self, _mem.remove, self.ptr)

    def size(self) -> int:
        return len(self)


def alloc_pinned_memory(nbytes: int) -> PinnedMemoryPointer:
    _guard("alloc_pinned_memory()")
    return PinnedMemoryPointer(nbytes)


# memcpy kinds (driver_types.h)
_H2H, _H2D, _D2H, _D2D, _DEFAULT = 0, 1, 2, 3, 4


def _memcpy(dst: int, src: int, nbytes: int, kind: int, stream: Stream, what: str) -> None:
    if kind not in (_H2H, _H2D, _D2H, _D2D, _DEFAULT):
        raise CUDARuntimeError(f"cudaErrorInvalidMemcpyDirection: kind {kind}")
    if nbytes < 0:
        raise CUDARuntimeError("cudaErrorInvalidValue: negative size")
    if nbytes == 0:
        return
    host_kinds = ("pinned",) if stream.is_capturing() else ("pinned", "host")
    dev = ("device",)
    either = ("device", "pinned")

    def check() -> None:
        for ptr, side in ((dst, "destination"), (src, "source")):
            on_device = (
                kind == _D2D
                or (kind == _H2D and side == "destination")
                or (kind == _D2H and side == "source")
            )
            if on_device:
                _check_range(ptr, nbytes, f"{what}: the {side}", dev)
            elif kind == _DEFAULT:
                _check_range(ptr, nbytes, f"{what}: the {side}", either)
            elif "host" not in host_kinds:  # a capture copies only from/to pinned host memory
                _check_range(ptr, nbytes, f"{what} (captured): the host {side}", host_kinds)
        if dst < src + nbytes and src < dst + nbytes:
            raise UndefinedBehaviour(f"emulated CUDA: {what}: source and destination overlap")

    check()

    def run() -> None:
        check()
        ctypes.memmove(dst, src, nbytes)
        stats["memcpy"] += 1

    _submit(stream, _Op("memcpy", f"{nbytes} bytes kind {kind}", run))


class MemoryPointer:
    """``ndarray.data``: the device address ``ptr`` of element 0 (keeps the array alive)."""

    def __init__(self, owner: Any, ptr: int) -> None:
        self._owner = owner
        self.ptr = ptr

    def __int__(self) -> int:
        return self.ptr

    def __add__(self, offset: int) -> MemoryPointer:
        return MemoryPointer(self._owner, self.ptr + int(offset))

    def copy_from_host_async(self, mem: Any, size: int, stream: Stream | None = None) -> None:
        s = get_current_stream() if stream is None else stream
        _memcpy(self.ptr, _addr(mem), int(size), _H2D, s, "copy_from_host_async")

    def copy_to_host_async(self, mem: Any, size: int, stream: Stream | None = None) -> None:
        s = get_current_stream() if stream is None else stream
        _memcpy(_addr(mem), self.ptr, int(size), _D2H, s, "copy_to_host_async")

    def copy_from_device_async(self, src: Any, size: int, stream: Stream | None = None) -> None:
        s = get_current_stream() if stream is None else stream
        _memcpy(self.ptr, _addr(src), int(size), _D2D, s, "copy_from_device_async")


# --- the array ------------------------------------------------------------------------------------

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
    "NumPy array explicitly."
)


def _unsupported(x: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}")


def _operand(x: Any) -> Any:
    """The NumPy value of an operator's other operand; NotImplemented for unknown objects."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (bool, int, float, complex, np.generic)):
        return x
    if isinstance(x, (np.ndarray, list, tuple)):
        raise _unsupported(x)
    return NotImplemented


def _unwrap(x: Any) -> Any:
    """Function arguments: device arrays to their NumPy arrays; NumPy arrays refused."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(a: np.ndarray) -> ndarray:
    out = object.__new__(ndarray)
    out._a = a if _is_device(a) else _to_device(a)
    return out


def _result(r: Any, out: Any = None, self: Any = None) -> Any:
    """Wrap NumPy results (arrays and scalars become device arrays, like CuPy's 0-d results)."""
    if isinstance(out, ndarray) and r is out._a:
        return out
    if isinstance(self, ndarray) and r is self._a:
        return self
    if isinstance(r, np.ndarray):
        return _wrap(r)
    if isinstance(r, np.generic):
        return _wrap(np.asarray(r))
    if isinstance(r, (tuple, list)):
        return type(r)(_result(v) for v in r)
    return r


def _binop(f: Callable[..., Any], reflected: bool = False) -> Callable[[ndarray, Any], Any]:
    def op(self: ndarray, other: Any) -> Any:
        o = _operand(other)
        if o is NotImplemented:
            return NotImplemented
        _guard(f"the operator {f.__name__}")
        return _result(f(o, self._a) if reflected else f(self._a, o))

    return op


def _iop(f: Callable[..., Any]) -> Callable[[ndarray, Any], Any]:
    def op(self: ndarray, other: Any) -> Any:
        o = _operand(other)
        if o is NotImplemented:
            return NotImplemented
        _guard(f"the in-place operator {f.__name__}")
        f(self._a, o, out=self._a)
        return self

    return op


def _unop(f: Callable[..., Any]) -> Callable[[ndarray], Any]:
    def op(self: ndarray) -> Any:
        _guard(f"the operator {f.__name__}")
        return _result(f(self._a))

    return op


def _basic_index(idx: Any) -> bool:
    parts = idx if isinstance(idx, tuple) else (idx,)
    return all(
        p is None
        or p is Ellipsis
        or (isinstance(p, (slice, int, np.integer)) and not isinstance(p, bool))
        for p in parts
    )


def _index(idx: Any) -> Any:
    if isinstance(idx, ndarray):
        return idx._a
    if isinstance(idx, tuple):
        return tuple(p._a if isinstance(p, ndarray) else p for p in idx)
    return idx


#: Methods that return a view when they can (no device work), else a copy (device work).
_VIEW_METHODS = frozenset({"reshape", "ravel", "view", "transpose", "swapaxes", "squeeze"})
#: Methods run on the device by delegation to NumPy.
_METHODS = frozenset(
    {
        "astype", "copy", "fill", "sum", "max", "min", "mean", "prod", "std", "var", "argmax",
        "argmin", "any", "all", "cumsum", "clip", "dot", "flatten", "take", "put", "repeat",
        "sort", "argsort", "nonzero", "round", "conj", "diagonal", "trace",
    }
)  # fmt: skip


class ndarray:
    """A device array: a NumPy array in device (host) memory, with CuPy's manners.

    Constructed by the module functions (``ndarray(shape, dtype)`` also allocates, as in CuPy).
    """

    __slots__ = ("__weakref__", "_a")
    __array_priority__ = 100.0
    __array_ufunc__ = None  # NumPy defers to our reflected operators (np.float32(2) * x works)
    __hash__ = None  # type: ignore[assignment]

    _a: np.ndarray

    def __init__(
        self, shape: Any, dtype: Any = float, memptr: Any = None, order: str = "C"
    ) -> None:
        if memptr is not None:
            raise NotImplementedError("emulated cupy.ndarray: memptr= is not supported")
        self._a = _alloc(shape, dtype, order)

    # metadata (no device work; legal during capture)
    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self, int(self._a.__array_interface__["data"][0]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._a.dtype

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def nbytes(self) -> int:
        return self._a.nbytes

    @property
    def itemsize(self) -> int:
        return self._a.itemsize

    @property
    def strides(self) -> tuple[int, ...]:
        return self._a.strides

    @property
    def flags(self) -> Any:
        return self._a.flags

    @property
    def T(self) -> ndarray:
        return _wrap(self._a.T)

    @property
    def device(self) -> Device:
        return Device()

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        a = self._a
        return {
            "shape": a.shape,
            "typestr": a.dtype.str,
            "data": (self.data.ptr, False),
            "strides": None if a.flags.c_contiguous else a.strides,
            "version": 3,
        }

    def __len__(self) -> int:
        return len(self._a)

    def __repr__(self) -> str:  # a debugging aid: reads without counting a sync
        return "emulated " + repr(self._a).replace("array(", "cupy.ndarray(", 1)

    # host transfers (synchronising reads are counted in stats["get"])
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(_IMPLICIT)

    def get(
        self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True
    ) -> Any:
        _guard("ndarray.get() (a device-to-host copy that synchronises)")
        stats["get"] += 1
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)  # type: ignore[call-overload]

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        _guard("ndarray.set() (a host-to-device copy)")
        stats["h2d"] += 1
        self._a[...] = arr

    def item(self) -> Any:
        _guard("ndarray.item() (a synchronising read)")
        stats["get"] += 1
        return self._a.item()

    def tolist(self) -> Any:
        _guard("ndarray.tolist() (a synchronising read)")
        stats["get"] += 1
        return self._a.tolist()

    def __float__(self) -> float:
        _guard("float(ndarray) (a synchronising read)")
        stats["get"] += 1
        return float(self._a)

    def __int__(self) -> int:
        _guard("int(ndarray) (a synchronising read)")
        stats["get"] += 1
        return int(self._a)

    def __bool__(self) -> bool:
        if self._a.size != 1:
            return bool(self._a)  # NumPy's ValueError for an ambiguous truth value
        _guard("bool(ndarray) (a synchronising read)")
        stats["get"] += 1
        return bool(self._a)

    # indexing: basic indices give views (no device work), others gather on the device
    def __getitem__(self, idx: Any) -> ndarray:
        if _basic_index(idx):
            parts = idx if isinstance(idx, tuple) else (idx,)
            if Ellipsis not in parts:
                parts = (*parts, Ellipsis)  # a 0-d view rather than a NumPy scalar
            return _wrap(self._a[parts])
        _guard("advanced indexing (a gather)")
        return _wrap(np.asarray(self._a[_index(idx)]))

    def __setitem__(self, idx: Any, value: Any) -> None:
        _guard("an assignment x[...] = v")
        if isinstance(value, ndarray):
            value = value._a
        elif isinstance(value, (np.ndarray, list, tuple)):
            stats["h2d"] += 1  # CuPy copies a host value over first
        self._a[_index(idx)] = value

    def __iter__(self) -> Iterator[ndarray]:
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._a)))

    def __getattr__(self, name: str) -> Any:
        if name in _VIEW_METHODS:
            return functools.partial(_view_method, self, name)
        if name in _METHODS:
            return functools.partial(_method, self, name)
        raise AttributeError(f"'cupy.ndarray' (emulated) object has no attribute {name!r}")

    __add__ = _binop(np.add)
    __radd__ = _binop(np.add, True)
    __sub__ = _binop(np.subtract)
    __rsub__ = _binop(np.subtract, True)
    __mul__ = _binop(np.multiply)
    __rmul__ = _binop(np.multiply, True)
    __truediv__ = _binop(np.true_divide)
    __rtruediv__ = _binop(np.true_divide, True)
    __floordiv__ = _binop(np.floor_divide)
    __rfloordiv__ = _binop(np.floor_divide, True)
    __mod__ = _binop(np.remainder)
    __rmod__ = _binop(np.remainder, True)
    __pow__ = _binop(np.power)
    __rpow__ = _binop(np.power, True)
    __matmul__ = _binop(np.matmul)
    __rmatmul__ = _binop(np.matmul, True)
    __and__ = _binop(np.bitwise_and)
    __rand__ = _binop(np.bitwise_and, True)
    __or__ = _binop(np.bitwise_or)
    __ror__ = _binop(np.bitwise_or, True)
    __xor__ = _binop(np.bitwise_xor)
    __rxor__ = _binop(np.bitwise_xor, True)
    __lshift__ = _binop(np.left_shift)
    __rshift__ = _binop(np.right_shift)
    __eq__ = _binop(np.equal)
    __ne__ = _binop(np.not_equal)
    __lt__ = _binop(np.less)
    __le__ = _binop(np.less_equal)
    __gt__ = _binop(np.greater)
    __ge__ = _binop(np.greater_equal)
    __iadd__ = _iop(np.add)
    __isub__ = _iop(np.subtract)
    __imul__ = _iop(np.multiply)
    __itruediv__ = _iop(np.true_divide)
    __ifloordiv__ = _iop(np.floor_divide)
    __imod__ = _iop(np.remainder)
    __ipow__ = _iop(np.power)
    __iand__ = _iop(np.bitwise_and)
    __ior__ = _iop(np.bitwise_or)
    __ixor__ = _iop(np.bitwise_xor)
    __neg__ = _unop(np.negative)
    __pos__ = _unop(np.positive)
    __abs__ = _unop(np.absolute)
    __invert__ = _unop(np.invert)


# gpubp.backends.to_numpy (and other code) knows a CuPy array by its type's module, "cupy"
ndarray.__module__ = "cupy"


def _view_method(self: ndarray, name: str, *args: Any, **kwargs: Any) -> Any:
    r = getattr(self._a, name)(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
    if isinstance(r, np.ndarray) and _root(r) is _root(self._a):
        return _wrap(r)
    _guard(f"ndarray.{name}() (a copy)")
    return _result(r)


def _method(self: ndarray, name: str, *args: Any, **kwargs: Any) -> Any:
    _guard(f"ndarray.{name}()")
    kw = {k: _unwrap(v) for k, v in kwargs.items()}
    return _result(getattr(self._a, name)(*_unwrap(args), **kw), kwargs.get("out"), self)


# --- module functions -----------------------------------------------------------------------------


def _shape_order(a: ndarray, order: str) -> str:
    if order in ("K", "A"):
        return "F" if a._a.flags.f_contiguous and not a._a.flags.c_contiguous else "C"
    return order


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _wrap(_alloc(shape, dtype, order))


def zeros(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return _wrap(_alloc(shape, dtype, order, fill=0))


def ones(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    out = _alloc(shape, dtype, order)
    out.fill(1)
    return _wrap(out)


def full(shape: Any, fill_value: Any, dtype: Any = None, order: str = "C") -> ndarray:
    if dtype is None:
        dtype = np.asarray(_unwrap(fill_value)).dtype
    out = _alloc(shape, dtype, order)
    out[...] = _operand(fill_value)
    return _wrap(out)


def _like(a: Any, dtype: Any, order: str, shape: Any) -> tuple[Any, Any, str]:
    if not isinstance(a, ndarray):
        raise _unsupported(a)
    return (
        a.shape if shape is None else shape,
        a.dtype if dtype is None else dtype,
        _shape_order(a, order),
    )


def empty_like(
    a: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    return empty(*_like(a, dtype, order, shape))


def zeros_like(
    a: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    return zeros(*_like(a, dtype, order, shape))


def ones_like(
    a: Any, dtype: Any = None, order: str = "K", subok: Any = None, shape: Any = None
) -> ndarray:
    return ones(*_like(a, dtype, order, shape))


def full_like(
    a: Any, fill_value: Any, dtype: Any = None, order: str = "K", shape: Any = None
) -> ndarray:
    s, d, o = _like(a, dtype, order, shape)
    return full(s, fill_value, d, o)


def arange(start: Any, stop: Any = None, step: Any = None, dtype: Any = None) -> ndarray:
    _guard("cupy.arange()")
    return _wrap(_to_device(np.arange(start, stop, step, dtype=dtype)))


def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
    """A device array: ``a`` itself if it is one of the right dtype, else a copy."""
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return a.astype(dtype)
    _guard("a host-to-device copy (cupy.asarray)")
    host = np.asarray(a, dtype=dtype, order=order)
    stats["h2d"] += 1
    return _wrap(_to_device(host))


def array(
    obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", subok: bool = False,
    ndmin: int = 0, *, blocking: bool = False,
) -> ndarray:  # fmt: skip
    if isinstance(obj, ndarray):
        _guard("cupy.array() (a device copy)")
        r = np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin)  # type: ignore[call-overload]
        return obj if r is obj._a else _wrap(_to_device(r))
    _guard("a host-to-device copy (cupy.array)")
    stats["h2d"] += 1
    return _wrap(_to_device(np.array(obj, dtype=dtype, order=order, ndmin=ndmin)))  # type: ignore[call-overload]


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        raise _unsupported(a)
    if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    _guard("cupy.ascontiguousarray() (a copy)")
    return _wrap(_to_device(np.ascontiguousarray(a._a, dtype=dtype)))


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)  # type: ignore[call-overload]


def get_array_module(*args: Any) -> Any:
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def _function(f: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(f)
    def fn(*args: Any, **kwargs: Any) -> Any:
        _guard(f"cupy.{name}()")
        kw = {k: _unwrap(v) for k, v in kwargs.items()}
        return _result(f(*_unwrap(args), **kw), kwargs.get("out"))

    return fn


class _Namespace:
    """A NumPy submodule (``linalg``, ``random``, ``fft``) with its functions wrapped."""

    def __init__(self, mod: types.ModuleType, name: str) -> None:
        self._mod, self._name = mod, name

    def __getattr__(self, name: str) -> Any:
        obj = getattr(self._mod, name)
        return _function(obj, f"{self._name}.{name}") if callable(obj) else obj


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


class _MemoryPool:
    """``get_default_memory_pool()``: no caching; bytes of live device allocations."""

    def used_bytes(self) -> int:
        return _mem.used

    def total_bytes(self) -> int:
        return _mem.used

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream: Any = None) -> None:
        """Nothing is cached, so nothing to free."""

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        if size is not None:
            set_device_memory(size)

    def get_limit(self) -> int:
        return _mem.limit


_pool = _MemoryPool()


def get_default_memory_pool() -> _MemoryPool:
    return _pool


def get_default_pinned_memory_pool() -> Any:
    return types.SimpleNamespace(free_all_blocks=lambda: None, n_free_blocks=lambda: 0)


# --- kernels ---------------------------------------------------------------------------------


def _kernel_module() -> Any:
    """The CPU kernel emulator (a function, so tests can substitute one)."""
    return importlib.import_module(__package__ + ".kernels")


class _DevPtr:
    """A kernel argument as a graph holds it: address and type, and a check that it is alive."""

    __slots__ = ("_raw", "data", "dtype", "flags")

    def __init__(self, a: ndarray) -> None:
        self.data = types.SimpleNamespace(ptr=a.data.ptr)
        self.dtype = a.dtype
        self.flags = types.SimpleNamespace(c_contiguous=bool(a.flags.c_contiguous))
        self._raw = weakref.ref(_root(a._a))

    def alive(self) -> bool:
        return self._raw() is not None


def _launch_dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise TypeError(f"{what} must be a tuple of 1 to 3 ints (CuPy's signature), got {value!r}")
    dims = tuple(int(d) for d in value)
    if any(d < 1 for d in dims):
        raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: {what}={value!r}")
    return dims


class RawFunction:
    """A kernel of a :class:`RawModule`: ``fn(grid, block, args, shared_mem=0, stream=None)``."""

    def __init__(self, name: str, fn: Any) -> None:
        self.name = name
        self._fn = fn

    def __call__(
        self,
        grid: tuple[int, ...],
        block: tuple[int, ...],
        args: Any,
        shared_mem: int = 0,
        stream: Any = None,
        enable_cooperative_groups: bool = False,
    ) -> None:
        g = _launch_dims(grid, "grid")
        b = _launch_dims(block, "block")
        if math.prod(b) > 1024 or g[0] >= 2**31 or any(d > 65535 for d in g[1:]):
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: grid={grid!r} block={block!r}")
        if shared_mem:
            raise CUDADriverError("emulated CUDA: dynamic shared memory is not emulated")
        s = get_current_stream() if stream is None else _stream_of(stream)
        held: list[Any] = []
        for k, a in enumerate(args):
            if isinstance(a, np.ndarray):
                raise TypeError(f"{self.name}: argument {k} is a NumPy array (host memory)")
            held.append(_DevPtr(a) if isinstance(a, ndarray) else a)
        fn, name = self._fn, self.name

        def run() -> None:
            for k, a in enumerate(held):
                if isinstance(a, _DevPtr) and not a.alive():
                    raise UndefinedBehaviour(
                        f"emulated CUDA: {name}: argument {k} points to freed device memory"
                    )
            fn(g, b, tuple(held))
            stats["launch"] += 1
            launches[name] += 1

        _submit(s, _Op("launch", name, run))


class RawModule:
    """Stands in for ``cupy.RawModule(code=..., options=..., name_expressions=[...])``.

    Compiled by the kernel emulator on the first :meth:`get_function` (never during capture).
    """

    def __init__(
        self,
        code: str | None = None,
        path: str | None = None,
        options: Any = (),
        backend: str = "nvrtc",
        translate_cucomplex: bool = False,
        *,
        enable_cooperative_groups: bool = False,
        name_expressions: Any = None,
        jitify: bool = False,
    ) -> None:
        if code is None:
            raise NotImplementedError("emulated RawModule: only code= is supported")
        self.code = code
        self.options = tuple(options)
        self.name_expressions = list(name_expressions or [])
        self._module: Any = None
        self._functions: dict[str, RawFunction] = {}

    def get_function(self, name: str) -> RawFunction:
        fn = self._functions.get(name)
        if fn is None:
            if name not in self.name_expressions:
                raise CUDADriverError(
                    f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name!r} is not one of the "
                    "module's name_expressions"
                )
            if self._module is None:
                _guard("compiling a RawModule")
                self._module = _kernel_module().Module(
                    self.code, self.name_expressions, options=self.options
                )
            fn = self._functions[name] = RawFunction(name, self._module.get_function(name))
        return fn


def RawKernel(code: str, name: str, options: Any = (), **kwargs: Any) -> RawFunction:
    return RawModule(code=code, options=options, name_expressions=[name]).get_function(name)


# --- argument helpers for the C-level emulations ---------------------------------------------


def _int(x: Any) -> int:
    """An int from an int or a ctypes scalar (``c_void_p(None)`` is 0)."""
    v = getattr(x, "value", x)
    return 0 if v is None else int(v)


def _addr(x: Any) -> int:
    """An address from an int, ``c_void_p``, ``byref(obj)``, a ctypes object or a MemoryPointer."""
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, MemoryPointer):
        return x.ptr
    if isinstance(x, ctypes.c_void_p):
        return int(x.value or 0)
    if type(x).__name__ == "CArgObject":  # ctypes.byref(obj)
        return ctypes.addressof(x._obj) + int(getattr(x, "_off", 0) or 0)
    if isinstance(x, ctypes._Pointer):
        return int(ctypes.cast(x, ctypes.c_void_p).value or 0)
    if isinstance(x, (ctypes._SimpleCData, ctypes.Array, ctypes.Structure)):
        return ctypes.addressof(x)
    raise TypeError(f"expected an address, got {x!r}")


def _view(ptr: int, dtype: np.dtype[Any], rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major ``(rows, cols)`` matrix at ``ptr`` with leading dimension ``ld``."""
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols), dtype)
    item = dtype.itemsize
    count = (cols - 1) * ld + rows
    buf = (ctypes.c_char * (count * item)).from_address(ptr)
    flat = np.frombuffer(memoryview(buf).cast("B"), dtype=dtype, count=count)
    return np.lib.stride_tricks.as_strided(flat, (rows, cols), (item, ld * item))


def _extent(rows: int, cols: int, ld: int, item: int) -> int:
    return 0 if rows == 0 or cols == 0 else ((cols - 1) * ld + rows) * item


# --- cuBLAS, C level -----------------------------------------------------------------------------

_CUBLAS_STATUS = {
    0: "CUBLAS_STATUS_SUCCESS",
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
}
_OK, _NOT_INITIALIZED, _INVALID, _EXEC_FAILED, _NOT_SUPPORTED = 0, 1, 7, 13, 15
#: data type -> (NumPy type, compute types cuBLAS accepts for it with that scale type)
_GEMM_TYPES: dict[int, tuple[Any, tuple[int, ...]]] = {
    0: (np.float32, (68, 69, 74, 75, 77)),  # CUDA_R_32F: COMPUTE_32F[_PEDANTIC|_FAST_*]
    1: (np.float64, (70, 71)),  # CUDA_R_64F: COMPUTE_64F[_PEDANTIC]
}
_COMPUTE_TYPES = frozenset({64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77})
_TF32 = 77


class _Handle:
    def __init__(self, ptr: int, device: int) -> None:
        self.ptr = ptr
        self.device = device
        self.stream = 0
        self.pointer_mode = 0
        self.math_mode = 0
        self.workspace: tuple[int, int] | None = None  # (ptr, bytes) given by SetWorkspace


_handles: dict[int, _Handle] = {}
_handle_ptrs = itertools.count(0x7B1A_0000, 0x40)


def _round_tf32(x: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32's 10 mantissa bits (nearest, ties away), as tensor cores read it."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


class EmulatedLibCublas:
    """The cuBLAS C functions gpubp's ctypes binding calls, on the emulated device.

    Every function returns an int status (0: success) and never crashes on a bad argument;
    :attr:`last_error` says why the last non-zero status was returned. Memory outside a live
    allocation, misaligned or overlapping operands raise :class:`UndefinedBehaviour` (on a GPU:
    an illegal address, or silently wrong results). ``cublasGemmEx`` is recorded instead of run
    when the handle's stream is capturing; in pointer mode DEVICE its alpha and beta are then read
    from device memory at each replay, in mode HOST at the call, as cuBLAS does.
    """

    def __init__(self) -> None:
        self.last_error = ""

    def _fail(self, status: int, why: str) -> int:
        self.last_error = f"{_CUBLAS_STATUS.get(status, status)}: {why}"
        return status

    def _handle(self, h: Any) -> _Handle | None:
        return _handles.get(_int(h))

    def cublasCreate_v2(self, handle_out: Any) -> int:
        if _capturing:
            _capturing[0]._invalidate("cublasCreate_v2")
            return self._fail(_NOT_SUPPORTED, "cublasCreate_v2 during stream capture")
        h = _Handle(next(_handle_ptrs), _device_id[0])
        _handles[h.ptr] = h
        target = getattr(handle_out, "_obj", None)
        if target is None and isinstance(handle_out, ctypes._Pointer):
            target = handle_out.contents
        if target is None and isinstance(handle_out, ctypes.c_void_p):
            target = handle_out
        if target is None:
            return self._fail(
                _INVALID, f"cublasCreate_v2 wants byref(c_void_p), got {handle_out!r}"
            )
        target.value = h.ptr
        return _OK

    def cublasDestroy_v2(self, handle: Any) -> int:
        if _handles.pop(_int(handle), None) is None:
            return self._fail(_NOT_INITIALIZED, f"no handle {_int(handle):#x}")
        return _OK

    def cublasSetStream_v2(self, handle: Any, stream: Any) -> int:
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasSetStream_v2: unknown handle")
        ptr = _int(stream)
        if ptr not in _streams or _streams[ptr]() is None:
            return self._fail(_INVALID, f"cublasSetStream_v2: no stream {ptr:#x}")
        h.stream = ptr
        h.workspace = None  # cuBLAS resets the workspace to its own pool on every SetStream
        return _OK

    def cublasGetStream_v2(self, handle: Any, stream_out: Any) -> int:
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasGetStream_v2: unknown handle")
        stream_out._obj.value = h.stream
        return _OK

    def cublasSetPointerMode_v2(self, handle: Any, mode: Any) -> int:
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasSetPointerMode_v2: unknown handle")
        if _int(mode) not in (0, 1):
            return self._fail(_INVALID, f"pointer mode {_int(mode)}")
        h.pointer_mode = _int(mode)
        return _OK

    def cublasGetPointerMode_v2(self, handle: Any, mode_out: Any) -> int:
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasGetPointerMode_v2: unknown handle")
        mode_out._obj.value = h.pointer_mode
        return _OK

    def cublasSetMathMode(self, handle: Any, mode: Any) -> int:
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasSetMathMode: unknown handle")
        m = _int(mode)
        if (
            m & ~0x1F and m != 16
        ):  # DEFAULT 0, TENSOR_OP 1, PEDANTIC 2, TF32 3, +DISALLOW_REDUCED 16
            return self._fail(_INVALID, f"math mode {m}")
        h.math_mode = m
        return _OK

    def cublasSetWorkspace_v2(self, handle: Any, ptr: Any, nbytes: Any) -> int:
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasSetWorkspace_v2: unknown handle")
        p, n = _addr(ptr), _int(nbytes)
        if n < 0 or (n > 0 and p == 0) or p % 256:
            return self._fail(_INVALID, f"workspace {p:#x} of {n} bytes (256-byte aligned?)")
        if n:
            _check_range(p, n, "cublasSetWorkspace_v2: the workspace")
        h.workspace = (p, n) if n else None
        return _OK

    def cublasGemmEx(
        self, handle: Any, transa: Any, transb: Any, m: Any, n: Any, k: Any, alpha: Any,
        A: Any, Atype: Any, lda: Any, B: Any, Btype: Any, ldb: Any, beta: Any,
        C: Any, Ctype: Any, ldc: Any, computeType: Any, algo: Any,
    ) -> int:  # fmt: skip
        """``C = alpha op(A) op(B) + beta C`` (column-major; ``C`` is ``m x n``)."""
        h = self._handle(handle)
        if h is None:
            return self._fail(_NOT_INITIALIZED, "cublasGemmEx: unknown handle")
        ta, tb = _int(transa), _int(transb)
        m, n, k = _int(m), _int(n), _int(k)
        lda, ldb, ldc = _int(lda), _int(ldb), _int(ldc)
        at, bt, ct, comp, alg = _int(Atype), _int(Btype), _int(Ctype), _int(computeType), _int(algo)
        if ta not in (0, 1, 2) or tb not in (0, 1, 2):
            return self._fail(_INVALID, f"transa={ta}, transb={tb}")
        if m < 0 or n < 0 or k < 0:
            return self._fail(_INVALID, f"m={m}, n={n}, k={k}")
        if comp not in _COMPUTE_TYPES:
            return self._fail(_INVALID, f"computeType {comp}")
        if not (-1 <= alg <= 23 or 99 <= alg <= 115):
            return self._fail(_INVALID, f"algo {alg}")
        if at != bt or bt != ct or at not in _GEMM_TYPES or comp not in _GEMM_TYPES[at][1]:
            return self._fail(_NOT_SUPPORTED, f"types A={at} B={bt} C={ct} with computeType {comp}")
        rows_a, cols_a = (m, k) if ta == 0 else (k, m)
        rows_b, cols_b = (k, n) if tb == 0 else (n, k)
        if lda < max(1, rows_a) or ldb < max(1, rows_b) or ldc < max(1, m):
            return self._fail(
                _INVALID, f"lda={lda} (>= {rows_a}), ldb={ldb} (>= {rows_b}), ldc={ldc} (>= {m})"
            )
        if m == 0 or n == 0:
            return _OK
        pa, pb, pc, palpha, pbeta = _addr(A), _addr(B), _addr(C), _addr(alpha), _addr(beta)
        if not palpha or not pbeta or not pc or (k > 0 and (not pa or not pb)):
            return self._fail(_INVALID, "a null pointer")
        dtype = np.dtype(_GEMM_TYPES[at][0])
        item = dtype.itemsize
        stream_ref = _streams.get(h.stream)
        stream = stream_ref() if stream_ref is not None else None
        if stream is None:
            return self._fail(_EXEC_FAILED, f"the handle's stream {h.stream:#x} is gone")
        if _capturing and not stream.is_capturing():
            _capturing[0]._invalidate("cublasGemmEx on a stream that is not capturing")
            return self._fail(_EXEC_FAILED, "cublasGemmEx on a stream other than the capturing one")
        if stream.is_capturing() and h.workspace is None:
            # cuBLAS would allocate its own workspace: not while capturing (the design gives one)
            return self._fail(
                _NOT_SUPPORTED,
                "cublasGemmEx captured without a workspace (cublasSetWorkspace_v2 after "
                "cublasSetStream_v2)",
            )
        ext_a, ext_b = _extent(rows_a, cols_a, lda, item), _extent(rows_b, cols_b, ldb, item)
        ext_c = _extent(m, n, ldc, item)
        host_scalars: tuple[Any, Any] | None = None
        if h.pointer_mode == 0:  # HOST: the scalars are read now, even when captured
            host_scalars = (_view(palpha, dtype, 1, 1, 1)[0, 0], _view(pbeta, dtype, 1, 1, 1)[0, 0])
        tf32 = comp == _TF32

        def check() -> None:
            # A and B are read only when k > 0; C always (m, n > 0 here)
            operands = (("A", pa, ext_a if k else 0), ("B", pb, ext_b if k else 0))
            for name, p, ext in (*operands, ("C", pc, ext_c)):
                if ext:
                    if p % item:
                        raise UndefinedBehaviour(f"cublasGemmEx: {name} {p:#x} is misaligned")
                    _check_range(p, ext, f"cublasGemmEx: {name}")
            if h.pointer_mode == 1:
                for name, p in (("alpha", palpha), ("beta", pbeta)):
                    _check_range(p, item, f"cublasGemmEx: {name} (pointer mode DEVICE)")
            for name, p, ext in operands:
                if ext and p < pc + ext_c and pc < p + ext:
                    raise UndefinedBehaviour(f"cublasGemmEx: C overlaps {name}")

        def run() -> None:
            check()
            if host_scalars is None:  # DEVICE: read at execution (a graph sees current values)
                al = _view(palpha, dtype, 1, 1, 1)[0, 0].copy()
                be = _view(pbeta, dtype, 1, 1, 1)[0, 0].copy()
            else:
                al, be = host_scalars
            Cv = _view(pc, dtype, m, n, ldc)
            with np.errstate(all="ignore"):  # a GPU overflows to inf silently
                _gemm_into(Cv, al, be, k)

        def _gemm_into(Cv: Any, al: Any, be: Any, k: int) -> None:
            # computed in the data type: float32 operands by a float32 matmul (float32
            # accumulation like cuBLAS's COMPUTE_32F), float64 by float64; TF32 rounds inputs
            if al != 0 and k > 0:
                Av = _view(pa, dtype, rows_a, cols_a, lda)
                Bv = _view(pb, dtype, rows_b, cols_b, ldb)
                opA = Av if ta == 0 else Av.T
                opB = Bv if tb == 0 else Bv.T
                if tf32:
                    opA, opB = _round_tf32(opA), _round_tf32(opB)
                prod = np.matmul(opA, opB).astype(dtype, copy=False) * al
            else:
                prod = np.zeros((m, n), dtype)  # alpha == 0: A and B are not read (BLAS)
            if be == 0:  # beta == 0: C is not read, so NaN in C does not propagate (BLAS)
                Cv[...] = prod
            else:
                Cv[...] = prod + be * Cv
            stats["gemm"] += 1

        check()
        _submit(stream, _Op("gemm", f"{m}x{n}x{k} {dtype.name} op={ta}{tb}", run))
        return _OK


_LIBCUBLAS = EmulatedLibCublas()


def emulated_libcublas() -> EmulatedLibCublas:
    """The emulated ``libcublas`` (the ctypes binding uses it in place of the real library)."""
    return _LIBCUBLAS


# --- cuBLAS, CuPy's wrappers (cupy.cuda.cublas / cupy_backends.cuda.libs.cublas) ------------------

_device_handles: dict[int, int] = {}


def _get_cublas_handle() -> int:
    dev = _device_id[0]
    if dev not in _device_handles:
        out = ctypes.c_void_p()
        _cublas_check(_LIBCUBLAS.cublasCreate_v2(ctypes.byref(out)))
        _device_handles[dev] = int(out.value or 0)
    return _device_handles[dev]


def _cublas_check(status: int) -> None:
    if status != 0:
        raise CUBLASError(status)


def _no_capture() -> None:
    if get_current_stream().is_capturing():
        raise NotImplementedError(
            "calling cuBLAS API during stream capture is currently unsupported"
        )


def _cupy_cublas() -> types.ModuleType:
    mod = types.ModuleType("cupy.cuda.cublas", "CuPy's cuBLAS wrappers, emulated (no capture).")
    lib = _LIBCUBLAS

    def create() -> int:
        _no_capture()
        out = ctypes.c_void_p()
        _cublas_check(lib.cublasCreate_v2(ctypes.byref(out)))
        return int(out.value or 0)

    def destroy(handle: int) -> None:
        _no_capture()
        _cublas_check(lib.cublasDestroy_v2(handle))

    def getPointerMode(handle: int) -> int:
        _no_capture()
        h = _handles.get(int(handle))
        if h is None:
            raise CUBLASError(1)
        return h.pointer_mode

    def setPointerMode(handle: int, mode: int) -> None:
        _no_capture()
        _cublas_check(lib.cublasSetPointerMode_v2(handle, mode))

    def getStream(handle: int) -> int:
        _no_capture()
        h = _handles.get(int(handle))
        if h is None:
            raise CUBLASError(1)
        return h.stream

    def setStream(handle: int, stream: int) -> None:
        _no_capture()
        _cublas_check(lib.cublasSetStream_v2(handle, stream))

    def setMathMode(handle: int, mode: int) -> None:
        _no_capture()
        _cublas_check(lib.cublasSetMathMode(handle, mode))

    def gemmEx(
        handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int, A: int,
        Atype: int, lda: int, B: int, Btype: int, ldb: int, beta: int, C: int, Ctype: int,
        ldc: int, computeType: int, algo: int,
    ) -> None:  # fmt: skip
        setStream(handle, get_current_stream().ptr)  # as CuPy does on every call
        _cublas_check(
            lib.cublasGemmEx(
                handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta,
                C, Ctype, ldc, computeType, algo,
            )
        )  # fmt: skip

    def _gemm(dtype_code: int, compute: int) -> Callable[..., None]:
        def gemm(
            handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int, A: int,
            lda: int, B: int, ldb: int, beta: int, C: int, ldc: int,
        ) -> None:  # fmt: skip
            gemmEx(
                handle, transa, transb, m, n, k, alpha, A, dtype_code, lda, B, dtype_code, ldb,
                beta, C, dtype_code, ldc, compute, -1,
            )  # fmt: skip

        return gemm

    for name, value in {
        "create": create,
        "destroy": destroy,
        "getPointerMode": getPointerMode,
        "setPointerMode": setPointerMode,
        "getStream": getStream,
        "setStream": setStream,
        "setMathMode": setMathMode,
        "gemmEx": gemmEx,
        "sgemm": _gemm(0, 68),
        "dgemm": _gemm(1, 70),
        "CUBLASError": CUBLASError,
        "CUBLAS_OP_N": 0,
        "CUBLAS_OP_T": 1,
        "CUBLAS_POINTER_MODE_HOST": 0,
        "CUBLAS_POINTER_MODE_DEVICE": 1,
        "CUBLAS_GEMM_DEFAULT": -1,
    }.items():
        setattr(mod, name, value)
    return mod


# --- NCCL over MPI --------------------------------------------------------------------------------

_NCCL_TYPES: dict[int, Any] = {
    0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
    6: np.float16, 7: np.float32, 8: np.float64,
}  # fmt: skip
_NCCL_OPS = ("SUM", "PROD", "MAX", "MIN", "AVG")
_nccl_group: list[list[Callable[[], None]]] = []


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a test dependency
        raise NcclError(f"emulated NCCL runs over MPI and mpi4py is missing ({exc})") from None
    return MPI


def _nccl_get_unique_id() -> tuple[int, ...]:
    return tuple(int(b) - 128 for b in os.urandom(128))  # CuPy: a tuple of 128 C chars


class NcclCommunicator:
    """``NcclCommunicator(ndev, unique_id, rank)``: the ranks that pass the same id, over MPI.

    Made collectively by every rank of ``MPI.COMM_WORLD`` (the id decides the group, the rank
    the order); two ranks of a group on one emulated device are refused, as NCCL refuses them.
    """

    def __init__(self, ndev: int, commId: Any, rank: int) -> None:
        MPI = _mpi()
        uid = bytes((int(c) + 128) % 256 for c in commId)
        if len(uid) != 128:
            raise NcclError("ncclInvalidArgument: the unique id is not 128 bytes")
        color = int.from_bytes(uid[:4], "little") & 0x7FFFFFFF
        self._comm = MPI.COMM_WORLD.Split(color, int(rank))
        self._MPI = MPI
        self.ndev, self.rank = int(ndev), int(rank)
        self.dev = _device_id[0]
        if self._comm.Get_size() != self.ndev or self._comm.Get_rank() != self.rank:
            raise NcclError(
                f"ncclInvalidUsage: {self._comm.Get_size()} ranks joined with this id, ndev is "
                f"{self.ndev}; ranks must be 0..ndev-1 and each given once"
            )
        where = self._comm.allgather((MPI.Get_processor_name(), self.dev))
        if len(set(where)) != len(where):
            raise NcclError(
                f"ncclInvalidUsage: Duplicate GPU detected ({where}): each rank needs its own "
                "device (the emulator has GPUBP_EMU_DEVICES devices, default 1)"
            )

    def size(self) -> int:
        return self.ndev

    def rank_id(self) -> int:
        return self.rank

    def device_id(self) -> int:
        return self.dev

    def destroy(self) -> None:
        if self._comm is not None:
            self._comm.Free()
            self._comm = None

    abort = destroy

    def _collective(self, name: str, stream: Any, body: Callable[[], None]) -> None:
        if self._comm is None:
            raise NcclError("ncclInvalidUsage: the communicator was destroyed")
        s = _stream_of(stream)
        op = _Op("nccl", name, body)
        if _nccl_group:
            _nccl_group[-1].append(lambda: _submit(s, op))
        else:
            _submit(s, op)

    def allReduce(
        self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: Any
    ) -> None:
        dtype, mpi_op = self._types(datatype, op)
        send, recv, count = _addr(sendbuf), _addr(recvbuf), int(count)
        nbytes = count * dtype.itemsize

        def body() -> None:
            _check_range(recv, nbytes, "ncclAllReduce: recvbuf")
            r = _view(recv, dtype, count, 1, max(1, count))[:, 0]
            if send == recv:
                self._comm.Allreduce(self._MPI.IN_PLACE, r, op=mpi_op)
            else:
                _check_range(send, nbytes, "ncclAllReduce: sendbuf")
                s = _view(send, dtype, count, 1, max(1, count))[:, 0].copy()
                self._comm.Allreduce(s, r, op=mpi_op)
            if _NCCL_OPS[int(op)] == "AVG":
                r /= self.ndev
            stats["allreduce"] += 1

        self._collective(f"allReduce {count} x {dtype.name}", stream, body)

    def broadcast(
        self, sendbuf: int, recvbuf: int, count: int, datatype: int, root: int, stream: Any
    ) -> None:
        dtype, _ = self._types(datatype, 0)
        send, recv, count = _addr(sendbuf), _addr(recvbuf), int(count)

        def body() -> None:
            _check_range(recv, count * dtype.itemsize, "ncclBroadcast: recvbuf")
            r = _view(recv, dtype, count, 1, max(1, count))[:, 0]
            if self.rank == int(root) and send != recv:
                r[...] = _view(send, dtype, count, 1, max(1, count))[:, 0]
            self._comm.Bcast(r, root=int(root))

        self._collective(f"broadcast {count} x {dtype.name}", stream, body)

    def bcast(self, buff: int, count: int, datatype: int, root: int, stream: Any) -> None:
        self.broadcast(buff, buff, count, datatype, root, stream)

    def _types(self, datatype: int, op: int) -> tuple[np.dtype[Any], Any]:
        if int(datatype) not in _NCCL_TYPES:
            raise NcclError(f"ncclInvalidArgument: datatype {datatype}")
        if not 0 <= int(op) < len(_NCCL_OPS):
            raise NcclError(f"ncclInvalidArgument: op {op}")
        name = _NCCL_OPS[int(op)]
        return np.dtype(_NCCL_TYPES[int(datatype)]), getattr(
            self._MPI, "SUM" if name == "AVG" else name
        )


def _nccl_group_start() -> None:
    _nccl_group.append([])


def _nccl_group_end() -> None:
    if not _nccl_group:
        raise NcclError("ncclInvalidUsage: groupEnd without groupStart")
    for call in _nccl_group.pop():
        call()


def _cupy_nccl() -> types.ModuleType:
    mod = types.ModuleType("cupy.cuda.nccl", "NCCL emulated over MPI (mpi4py).")
    values: dict[str, Any] = {
        "NcclCommunicator": NcclCommunicator,
        "NcclError": NcclError,
        "get_unique_id": _nccl_get_unique_id,
        "groupStart": _nccl_group_start,
        "groupEnd": _nccl_group_end,
        "get_version": lambda: 22000,
        "get_build_version": lambda: 22000,
        "available": True,
    }
    names = ("INT8", "UINT8", "INT32", "UINT32", "INT64", "UINT64", "FLOAT16", "FLOAT32")
    for i, t in enumerate((*names, "FLOAT64")):
        values[f"NCCL_{t}"] = i
    values.update(NCCL_CHAR=0, NCCL_INT=2, NCCL_HALF=6, NCCL_FLOAT=7, NCCL_DOUBLE=8)
    for i, op in enumerate(_NCCL_OPS):
        values[f"NCCL_{op}"] = i
    for name, value in values.items():
        setattr(mod, name, value)
    return mod


# --- the cuda namespace ---------------------------------------------------------------------------


def _device_properties(device: int) -> dict[str, Any]:
    Device(device)
    return {
        "name": b"Emulated CUDA device (CPU)",
        "totalGlobalMem": _mem.limit,
        "multiProcessorCount": os.cpu_count() or 1,
        "major": 9,
        "minor": 0,
        "warpSize": 32,
        "maxThreadsPerBlock": 1024,
        "sharedMemPerBlock": 49152,
        "clockRate": 0,
        "memoryClockRate": 0,
        "memoryBusWidth": 0,
    }


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
