"""Device memory of the emulated CuPy: allocations in aligned host memory, their address ranges
(the bounds checks), pinned host memory, copies between them, the memory pool and the pointer
helpers the C-level emulations read arguments with.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import os
import types
import weakref
from typing import Any

import numpy as np

from ._common import CUDARuntimeError, OutOfMemoryError, UndefinedBehaviour, stats
from ._stream import Stream, _guard, _Op, _submit, get_current_stream

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


# --- pointer arguments of the C-level emulations --------------------------------------------------


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
