"""NumPy's own BLAS, callable from inside ``@njit`` kernels as :func:`gemm`.

NumPy's wheels ship OpenBLAS with 64-bit integers under the names ``scipy_cblas_sgemm64_`` /
``scipy_cblas_dgemm64_``. We look those symbols up through NumPy's own extension module (so we
get the very library NumPy's ``matmul`` uses, with its thread pool), register their addresses
with LLVM under fixed names, and declare them as external functions; kernels that call them
stay cacheable on disk because they refer to the symbol by name, not by address.

Where no such symbol is found (a NumPy built against another BLAS), :data:`AVAILABLE` is False
and the backend does its GEMMs with ``numpy.matmul`` instead: slower for small layers (a Python
call per GEMM, no GEMM with ``beta = 1``), never wrong.

Row-major CBLAS: ``C (M, N) = alpha op(A) op(B) + beta C``.
"""

from __future__ import annotations

import ctypes
import importlib
from typing import Any

import numpy as np
from numba import types
from numba.extending import overload

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

#: (single, double, set_num_threads, get_num_threads) symbol names, ILP64 builds only.
_CANDIDATES = (
    (
        "scipy_cblas_sgemm64_",
        "scipy_cblas_dgemm64_",
        "scipy_openblas_set_num_threads64_",
        "scipy_openblas_get_num_threads64_",
    ),
    (
        "cblas_sgemm64_",
        "cblas_dgemm64_",
        "openblas_set_num_threads64_",
        "openblas_get_num_threads64_",
    ),
)


def _numpy_library() -> ctypes.CDLL | None:
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            mod = importlib.import_module(name)
            return ctypes.CDLL(mod.__file__)
        except (ImportError, OSError, AttributeError, TypeError):
            continue
    return None


def _find() -> tuple[int, int, Any, Any] | None:
    lib = _numpy_library()
    if lib is None:
        return None
    for s, d, setn, getn in _CANDIDATES:
        try:
            sgemm, dgemm = getattr(lib, s), getattr(lib, d)
        except AttributeError:
            continue
        set_threads = getattr(lib, setn, None)
        get_threads = getattr(lib, getn, None)
        if set_threads is not None and get_threads is not None:
            set_threads.argtypes = [ctypes.c_int]
            set_threads.restype = None
            get_threads.argtypes = []
            get_threads.restype = ctypes.c_int
        else:
            set_threads = get_threads = None
        addr = ctypes.cast(sgemm, ctypes.c_void_p).value
        daddr = ctypes.cast(dgemm, ctypes.c_void_p).value
        if addr and daddr:
            return addr, daddr, set_threads, get_threads
    return None


_found = _find()
#: Whether the kernels can call NumPy's BLAS directly.
AVAILABLE: bool = _found is not None
_set_threads = _found[2] if _found else None
_get_threads = _found[3] if _found else None

if _found is not None:
    import llvmlite.binding as ll

    ll.add_symbol("gpubp_cblas_sgemm64", _found[0])
    ll.add_symbol("gpubp_cblas_dgemm64", _found[1])


def _gemm_type(real: Any) -> Any:
    i32, i64, p = types.int32, types.int64, types.intp
    return types.void(i32, i32, i32, i64, i64, i64, real, p, i64, p, i64, real, p, i64)


_sgemm = types.ExternalFunction("gpubp_cblas_sgemm64", _gemm_type(types.float32))
_dgemm = types.ExternalFunction("gpubp_cblas_dgemm64", _gemm_type(types.float64))


def blas_threads() -> int | None:
    """The thread count of NumPy's OpenBLAS, or None if it cannot be asked."""
    return None if _get_threads is None else int(_get_threads())


def set_blas_threads(n: int) -> None:
    """Set the thread count of NumPy's OpenBLAS (process-wide, as ``threadpoolctl`` does)."""
    if _set_threads is not None:
        _set_threads(int(n))


def gemm(ta, tb, M, N, K_, alpha, A, lda, B, ldb, beta, C, ldc):  # type: ignore[no-untyped-def]
    """Row-major ``C = alpha op(A) op(B) + beta C`` (``ta``, ``tb``: transpose flags)."""
    raise NotImplementedError("gemm is only callable from @njit code")


@overload(gemm)
def _gemm_impl(ta, tb, M, N, K_, alpha, A, lda, B, ldb, beta, C, ldc):  # type: ignore[no-untyped-def]
    fn: Any = _sgemm if C.dtype == types.float32 else _dgemm
    real = np.float32 if C.dtype == types.float32 else np.float64

    def impl(ta, tb, M, N, K_, alpha, A, lda, B, ldb, beta, C, ldc):  # type: ignore[no-untyped-def]
        fn(
            _ROW_MAJOR,
            _TRANS if ta else _NO_TRANS,
            _TRANS if tb else _NO_TRANS,
            M,
            N,
            K_,
            real(alpha),
            A.ctypes.data,
            lda,
            B.ctypes.data,
            ldb,
            real(beta),
            C.ctypes.data,
            ldc,
        )

    return impl
