"""The device context that the ops and the captured train step share.

:class:`DeviceContext` holds the cupy module and, per device (made on first use of it), a
:class:`DeviceState`: the compiled kernels, the status words, the GEMM constants and the pinned
host ring of hyper-parameter uploads. It also hands out gpubp's cuBLAS handle for the current
device and runs the row-major GEMM on it. Both :mod:`.backend` (the ops) and :mod:`.graph` (the
recorded step) use it, and neither imports the other.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from . import catalogue as ck
from . import launch
from .cublas import Cublas

#: A pointer-table row: ``(param, grad, slot1, slot2, size)`` (see :func:`catalogue.build_table`).
Entry = tuple[int, int, int, int, int]


class Kernels:
    """The compiled kernel families of one device, compiled lazily, one RawModule per family.

    Calling it with an instantiation name gives that kernel, compiling its family's module on
    first use (``cupy_module.RawModule`` with the catalogue's name expressions).
    """

    def __init__(self, cupy_module: Any) -> None:
        self._cp = cupy_module
        self._modules: dict[str, Any] = {}
        self._functions: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            family = ck.family_of(name)  # raises for a name the compile test does not cover
            mod = self._modules.get(family)
            if mod is None:
                mod = self._cp.RawModule(
                    code=ck.source(family),
                    options=ck.COMPILE_OPTIONS,
                    name_expressions=ck.name_expressions(family),
                )
                self._modules[family] = mod
            fn = self._functions[name] = mod.get_function(name)
        return fn


class HostRing:
    """Pinned host slots for the per-step hyper-parameter upload (asynchronous, never a sync).

    A slot is reused only after the copy that read it has finished (its event, asked first and
    waited for only if that copy is still queued), so the host never overwrites values a queued
    copy has yet to read. Each slot keeps one event, recorded again at each use.
    """

    def __init__(self, cp: Any, slots: int = 64, nbytes: int = ck.HP_SLOTS * 8) -> None:
        self._cp = cp
        self._mem = cp.cuda.alloc_pinned_memory(slots * nbytes)
        self._nbytes = nbytes
        self._events: list[Any] = [None] * slots
        self._recorded = [False] * slots
        self._next = 0

    def upload(self, host: np.ndarray, dst: Any) -> None:
        """Copy ``host`` into the device array ``dst`` on the current stream, asynchronously."""
        k = self._next
        self._next = (k + 1) % len(self._events)
        ev = self._events[k]
        if ev is None:
            ev = self._events[k] = self._cp.cuda.Event(block=False, disable_timing=True)
        elif self._recorded[k] and not ev.done:
            ev.synchronize()
        view = np.frombuffer(self._mem, dtype=np.uint8, count=self._nbytes, offset=k * self._nbytes)
        view[: host.nbytes] = host.view(np.uint8)
        stream = self._cp.cuda.get_current_stream()
        dst.data.copy_from_host_async(self._mem.ptr + k * self._nbytes, host.nbytes, stream)
        ev.record(stream)
        self._recorded[k] = True


class DeviceState:
    """One device's kernels, status words, GEMM constants and host ring.

    Attributes
    ----------
    id : int
        The device number.
    kernels : Kernels
        The kernel families, compiled on first use.
    status : device array
        The train steps' status word (``STATUS_SLOTS`` int32), read at synchronisation points.
    scratch_status : device array
        The status word of every op outside a train step.
    clear_status : device array
        Read only, never written: the stand-alone update's word, which must not skip itself for a
        flag some earlier stand-alone op raised.
    ring : HostRing
        The pinned slots of the hyper-parameter uploads.
    """

    def __init__(self, cp: Any, device: int) -> None:
        self.id = device
        self.kernels = Kernels(cp)
        self.status = cp.zeros(ck.STATUS_SLOTS, dtype=np.int32)
        self.scratch_status = cp.zeros(ck.STATUS_SLOTS, dtype=np.int32)
        self.clear_status = cp.zeros(ck.STATUS_SLOTS, dtype=np.int32)
        self.ring = HostRing(cp)
        self.consts: dict[str, Any] = {}


# One cuBLAS handle per (cupy module, device, thread), shared by every context, as CuPy keeps its
# own: handles are never destroyed (at exit the CUDA context may already be gone).
_HANDLES: dict[tuple[int, int, int], Cublas] = {}
_HANDLES_LOCK = threading.Lock()


def _cublas_for(cp: Any, device: int) -> Cublas:
    key = (id(cp), device, threading.get_ident())
    blas = _HANDLES.get(key)
    if blas is None:
        with _HANDLES_LOCK:
            blas = _HANDLES.get(key)
            if blas is None:
                blas = _HANDLES[key] = Cublas(cp)
    return blas


def table_entries(params: list[Any], grads: list[Any], slots: list[list[Any]]) -> list[Entry]:
    """The pointer-table rows of an update: each parameter, its gradient and state slots."""
    rows = []
    for i, (p, g) in enumerate(zip(params, grads)):
        s1 = slots[0][i].data.ptr if len(slots) > 0 else 0
        s2 = slots[1][i].data.ptr if len(slots) > 1 else 0
        rows.append((p.data.ptr, g.data.ptr, s1, s2, int(p.size)))
    return rows


class DeviceContext:
    """The cupy module, each device's :class:`DeviceState`, cuBLAS and the GEMM.

    Parameters
    ----------
    cupy : module
        ``cupy``, or a module that behaves like it.
    tf32 : bool
        Allow TF32 tensor-core math in float32 GEMMs.
    """

    def __init__(self, cupy: Any, tf32: bool = False) -> None:
        self.cp = cupy
        self.tf32 = bool(tf32)
        self._states: dict[int, DeviceState] = {}

    def device(self) -> DeviceState:
        """The current device's state, made on its first use."""
        dev = self.cp.cuda.Device().id
        state = self._states.get(dev)
        if state is None:
            state = self._states[dev] = DeviceState(self.cp, dev)
        return state

    def devices(self) -> list[DeviceState]:
        """The states of every device used so far."""
        return list(self._states.values())

    def kernel(self, name: str) -> Any:
        """The compiled kernel ``name`` (a catalogue instantiation) on the current device."""
        return self.device().kernels(name)

    def cublas(self) -> Cublas:
        """gpubp's cuBLAS handle for the current device, on the current stream."""
        blas = _cublas_for(self.cp, self.device().id)
        blas.set_stream(self.cp.cuda.get_current_stream().ptr)
        return blas

    def constants(self, dtype: Any) -> Any:
        """A device hyper-parameter block holding only the GEMM constants ``ONE`` and ``ZERO``."""
        consts = self.device().consts
        key = np.dtype(dtype).str
        if key not in consts:
            hp = np.zeros(ck.HP_SLOTS, dtype=dtype)
            hp[ck.HP["ONE"]] = 1
            consts[key] = self.cp.asarray(hp)
        return consts[key]

    def gemm(
        self,
        trans_a: bool,
        trans_b: bool,
        A: Any,
        B: Any,
        C: Any,
        alpha: str,
        beta: str,
        hp: Any,
    ) -> Any:
        """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` on the current stream.

        ``alpha`` and ``beta`` are hyper-parameter slot names read from the device block ``hp``
        (device pointer mode), so a captured graph reads their current values. All arrays are
        C-contiguous 2-D arrays of one dtype (:func:`gpubp.backends.cuda.launch.gemm`).
        """
        return launch.gemm(self.cublas(), trans_a, trans_b, A, B, C, alpha, beta, hp, self.tf32)
