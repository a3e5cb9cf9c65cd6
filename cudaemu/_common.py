"""State and errors shared by the emulated CuPy's modules: counters, device selection, errors.

Every piece of module-level state of the emulator lives in exactly one module; this one holds the
counters (:data:`stats`, :data:`launches`) and the current device, which all the others update.
"""

from __future__ import annotations

import collections
import os
from typing import Any

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


# --- devices --------------------------------------------------------------------------------------

_N_DEVICES = int(os.environ.get("GPUBP_EMU_DEVICES", "1"))
_device_id = [0]  # the current device


# --- argument helpers -----------------------------------------------------------------------------


def _int(x: Any) -> int:
    """An int from an int or a ctypes scalar (``c_void_p(None)`` is 0)."""
    v = getattr(x, "value", x)
    return 0 if v is None else int(v)
