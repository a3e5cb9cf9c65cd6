"""The emulated ``cupy.cuda.Device`` (``GPUBP_EMU_DEVICES`` devices, default 1)."""

from __future__ import annotations

import os
from typing import Any

from ._common import _N_DEVICES, CUDARuntimeError, _device_id, stats
from ._cublas import _get_cublas_handle
from ._memory import _mem, _mem_get_info
from ._stream import _guard
from .kernels import compiler_missing


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
    """Whether the emulated device can run kernels: a C++ compiler to build them is installed
    (:func:`cudaemu.kernels.compiler_missing` says what to install when not)."""
    return compiler_missing() is None


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
