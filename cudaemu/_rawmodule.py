"""``RawModule`` / ``RawKernel`` of the emulated CuPy: kernels compiled and run by the CPU kernel
emulator (:mod:`cudaemu.kernels`), launched on a stream (or captured).
"""

from __future__ import annotations

import importlib
import math
import types
import weakref
from typing import Any

import numpy as np

from ._array import ndarray
from ._common import CUDADriverError, UndefinedBehaviour, launches, stats
from ._memory import _root
from ._stream import _guard, _Op, _stream_of, _submit, get_current_stream

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
