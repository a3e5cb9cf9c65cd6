"""cuBLAS on the emulated device: the C functions gpubp's ctypes binding calls
(:class:`EmulatedLibCublas`) and CuPy's own wrappers over them (``cupy.cuda.cublas``).
"""

from __future__ import annotations

import ctypes
import itertools
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from ._common import UndefinedBehaviour, _device_id, _int, stats
from ._memory import _addr, _check_range, _extent, _view
from ._stream import Stream, _capturing, _Op, _streams, _submit, get_current_stream

# --- cuBLAS, C level -----------------------------------------------------------------------------


class CUBLASError(RuntimeError):
    """Stands in for ``cupy_backends.cuda.libs.cublas.CUBLASError``."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"{_CUBLAS_STATUS.get(status, 'UNKNOWN')} (status {status})")


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


def _gemm_arguments_error(
    ta: int, tb: int, m: int, n: int, k: int, lda: int, ldb: int, ldc: int,
    at: int, bt: int, ct: int, comp: int, alg: int,
) -> tuple[int, str] | None:  # fmt: skip
    """Why ``cublasGemmEx`` refuses these values, as ``(status, why)``; None if it takes them."""
    if ta not in (0, 1, 2) or tb not in (0, 1, 2):
        return _INVALID, f"transa={ta}, transb={tb}"
    if m < 0 or n < 0 or k < 0:
        return _INVALID, f"m={m}, n={n}, k={k}"
    if comp not in _COMPUTE_TYPES:
        return _INVALID, f"computeType {comp}"
    if not (-1 <= alg <= 23 or 99 <= alg <= 115):
        return _INVALID, f"algo {alg}"
    if at != bt or bt != ct or at not in _GEMM_TYPES or comp not in _GEMM_TYPES[at][1]:
        return _NOT_SUPPORTED, f"types A={at} B={bt} C={ct} with computeType {comp}"
    rows_a = m if ta == 0 else k
    rows_b = k if tb == 0 else n
    if lda < max(1, rows_a) or ldb < max(1, rows_b) or ldc < max(1, m):
        return _INVALID, f"lda={lda} (>= {rows_a}), ldb={ldb} (>= {rows_b}), ldc={ldc} (>= {m})"
    return None


class _GemmEx:
    """A ``cublasGemmEx`` call whose arguments were accepted (``m, n > 0``): :meth:`check` runs
    at the call and again before each execution (a graph replay may reach freed memory);
    :meth:`run` is what executes, now or in each replay of a graph.
    """

    def __init__(
        self, h: _Handle, trans: tuple[int, int], mnk: tuple[int, int, int],
        lds: tuple[int, int, int], ptrs: tuple[int, int, int, int, int], dtype: np.dtype[Any],
        tf32: bool,
    ) -> None:  # fmt: skip
        self.h = h
        self.ta, self.tb = ta, tb = trans
        self.m, self.n, self.k = m, n, k = mnk
        self.lda, self.ldb, self.ldc = lda, ldb, ldc = lds
        self.pa, self.pb, self.pc, self.palpha, self.pbeta = ptrs
        self.dtype, self.item, self.tf32 = dtype, dtype.itemsize, tf32
        self.rows_a, self.cols_a = (m, k) if ta == 0 else (k, m)
        self.rows_b, self.cols_b = (k, n) if tb == 0 else (n, k)
        self.ext_a = _extent(self.rows_a, self.cols_a, lda, self.item)
        self.ext_b = _extent(self.rows_b, self.cols_b, ldb, self.item)
        self.ext_c = _extent(m, n, ldc, self.item)
        self.host_scalars: tuple[Any, Any] | None = None
        if h.pointer_mode == 0:  # HOST: the scalars are read now, even when captured
            self.host_scalars = (
                _view(self.palpha, dtype, 1, 1, 1)[0, 0],
                _view(self.pbeta, dtype, 1, 1, 1)[0, 0],
            )

    @property
    def name(self) -> str:
        return f"{self.m}x{self.n}x{self.k} {self.dtype.name} op={self.ta}{self.tb}"

    def check(self) -> None:
        pa, pb, pc, item, k, ext_c = self.pa, self.pb, self.pc, self.item, self.k, self.ext_c
        # A and B are read only when k > 0; C always (m, n > 0 here)
        operands = (("A", pa, self.ext_a if k else 0), ("B", pb, self.ext_b if k else 0))
        for name, p, ext in (*operands, ("C", pc, ext_c)):
            if ext:
                if p % item:
                    raise UndefinedBehaviour(f"cublasGemmEx: {name} {p:#x} is misaligned")
                _check_range(p, ext, f"cublasGemmEx: {name}")
        if self.h.pointer_mode == 1:
            for name, p in (("alpha", self.palpha), ("beta", self.pbeta)):
                _check_range(p, item, f"cublasGemmEx: {name} (pointer mode DEVICE)")
        for name, p, ext in operands:
            if ext and p < pc + ext_c and pc < p + ext:
                raise UndefinedBehaviour(f"cublasGemmEx: C overlaps {name}")

    def run(self) -> None:
        self.check()
        dtype = self.dtype
        if self.host_scalars is None:  # DEVICE: read at execution (a graph sees current values)
            al = _view(self.palpha, dtype, 1, 1, 1)[0, 0].copy()
            be = _view(self.pbeta, dtype, 1, 1, 1)[0, 0].copy()
        else:
            al, be = self.host_scalars
        Cv = _view(self.pc, dtype, self.m, self.n, self.ldc)
        with np.errstate(all="ignore"):  # a GPU overflows to inf silently
            self._gemm_into(Cv, al, be)

    def _gemm_into(self, Cv: Any, al: Any, be: Any) -> None:
        # computed in the data type: float32 operands by a float32 matmul (float32
        # accumulation like cuBLAS's COMPUTE_32F), float64 by float64; TF32 rounds inputs
        dtype = self.dtype
        if al != 0 and self.k > 0:
            Av = _view(self.pa, dtype, self.rows_a, self.cols_a, self.lda)
            Bv = _view(self.pb, dtype, self.rows_b, self.cols_b, self.ldb)
            opA = Av if self.ta == 0 else Av.T
            opB = Bv if self.tb == 0 else Bv.T
            if self.tf32:
                opA, opB = _round_tf32(opA), _round_tf32(opB)
            prod = np.matmul(opA, opB).astype(dtype, copy=False) * al
        else:
            prod = np.zeros((self.m, self.n), dtype)  # alpha == 0: A and B are not read (BLAS)
        if be == 0:  # beta == 0: C is not read, so NaN in C does not propagate (BLAS)
            Cv[...] = prod
        else:
            Cv[...] = prod + be * Cv
        stats["gemm"] += 1


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
        error = _gemm_arguments_error(ta, tb, m, n, k, lda, ldb, ldc, at, bt, ct, comp, alg)
        if error is not None:
            return self._fail(*error)
        if m == 0 or n == 0:
            return _OK
        pa, pb, pc, palpha, pbeta = _addr(A), _addr(B), _addr(C), _addr(alpha), _addr(beta)
        if not palpha or not pbeta or not pc or (k > 0 and (not pa or not pb)):
            return self._fail(_INVALID, "a null pointer")
        stream = self._gemm_stream(h)
        if isinstance(stream, int):
            return stream
        dtype = np.dtype(_GEMM_TYPES[at][0])
        ptrs = (pa, pb, pc, palpha, pbeta)
        gemm = _GemmEx(h, (ta, tb), (m, n, k), (lda, ldb, ldc), ptrs, dtype, comp == _TF32)
        gemm.check()
        _submit(stream, _Op("gemm", gemm.name, gemm.run))
        return _OK

    def _gemm_stream(self, h: _Handle) -> Stream | int:
        """The stream ``cublasGemmEx`` runs on, or the status it fails with."""
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
        return stream


_LIBCUBLAS = EmulatedLibCublas()


def libcublas() -> EmulatedLibCublas:
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


def _typed_gemm(gemm_ex: Callable[..., None], dtype_code: int, compute: int) -> Callable[..., None]:
    """CuPy's ``sgemm`` / ``dgemm``: ``gemmEx`` with every type the one ``dtype_code``."""

    def gemm(
        handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int, A: int,
        lda: int, B: int, ldb: int, beta: int, C: int, ldc: int,
    ) -> None:  # fmt: skip
        gemm_ex(
            handle, transa, transb, m, n, k, alpha, A, dtype_code, lda, B, dtype_code, ldb,
            beta, C, dtype_code, ldc, compute, -1,
        )  # fmt: skip

    return gemm


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

    for name, value in {
        "create": create,
        "destroy": destroy,
        "getPointerMode": getPointerMode,
        "setPointerMode": setPointerMode,
        "getStream": getStream,
        "setStream": setStream,
        "setMathMode": setMathMode,
        "gemmEx": gemmEx,
        "sgemm": _typed_gemm(gemmEx, 0, 68),
        "dgemm": _typed_gemm(gemmEx, 1, 70),
        "CUBLASError": CUBLASError,
        "CUBLAS_OP_N": 0,
        "CUBLAS_OP_T": 1,
        "CUBLAS_POINTER_MODE_HOST": 0,
        "CUBLAS_POINTER_MODE_DEVICE": 1,
        "CUBLAS_GEMM_DEFAULT": -1,
    }.items():
        setattr(mod, name, value)
    return mod
