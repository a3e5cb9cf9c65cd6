"""The GEMM provider: the fastest BLAS found at start, callable from inside ``@njit`` kernels.

Chosen once, at import, in this order (``GPUBP_GEMM=mkl|openblas|matmul`` forces one):

1. **MKL** (``libmkl_rt``, from the ``mkl`` wheel: ``pip install 'gpubp[fast]'`` on x86-64). Its
   GEMMs are the fastest measured on the step's shapes (README, Performance), and they are what
   PyTorch's CPU build uses.
2. **NumPy's own OpenBLAS**: NumPy's wheels export it under ``scipy_cblas_sgemm64_`` (64-bit
   integers); we look the symbols up through NumPy's extension module, so this is the very
   library ``numpy.matmul`` uses, with its thread pool.
3. Neither (a NumPy built against another BLAS): :data:`PROVIDER` is None and the backend does
   its GEMMs with ``numpy.matmul`` instead, a Python call per GEMM: slower, never wrong.

Both libraries are called through their ILP64 CBLAS entry points (``cblas_sgemm_64`` in MKL),
so the kernels see one signature whichever is loaded. The addresses are registered with LLVM
under fixed names and declared as external functions; the kernels stay cacheable on disk
because they refer to the symbol by name, and the cache folder is per provider
(:mod:`.cache`), so a kernel compiled against one is never loaded against the other.

Row-major CBLAS: ``C (M, N) = alpha op(A) op(B) + beta C``.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import types
from numba.extending import overload

from .pool import OMP

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_MKL_THREADING_GNU = 3  # MKL_THREADING_GNU in mkl_service.h
_MKL_CBWR_AUTO, _MKL_CBWR_STRICT, _MKL_CBWR_SUCCESS = 2, 0x10000, 0  # mkl_cbwr.h

#: Accepted values of ``GPUBP_GEMM``.
CHOICES = ("mkl", "openblas", "matmul")


@dataclass(frozen=True)
class Provider:
    """One BLAS whose ILP64 ``sgemm`` / ``dgemm`` the kernels call."""

    #: "mkl" or "openblas"
    name: str
    #: the shared library the symbols come from
    library: str
    #: the library's own version string
    version: str
    #: how the library runs its threads
    threading: str
    sgemm: int
    dgemm: int
    get_threads: Any
    set_threads: Any
    #: whether a GEMM gives the same bits at every thread count (so the thread count of a
    #: step may change under a run, :mod:`.tuner`): MKL in its strict reproducible mode
    same_at_any_threads: bool = False

    def threads(self) -> int:
        """How many threads a GEMM uses now (process-wide)."""
        return int(self.get_threads())


def _numpy_library() -> ctypes.CDLL | None:
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            mod = importlib.import_module(name)
            return ctypes.CDLL(mod.__file__)
        except (ImportError, OSError, AttributeError, TypeError):
            continue
    return None


def _address(lib: Any, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def _int_function(lib: Any, name: str, args: list[Any], res: Any) -> Any:
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = args, res
    return fn


def _openblas() -> Provider | None:
    lib = _numpy_library()
    if lib is None:
        return None
    for prefix in ("scipy_", ""):
        s = _address(lib, f"{prefix}cblas_sgemm64_")
        d = _address(lib, f"{prefix}cblas_dgemm64_")
        if not (s and d):
            continue
        tag = f"{prefix}openblas"
        try:
            get = _int_function(lib, f"{tag}_get_num_threads64_", [], ctypes.c_int)
            put = _int_function(lib, f"{tag}_set_num_threads64_", [ctypes.c_int], None)
            config = _int_function(lib, f"{tag}_get_config64_", [], ctypes.c_char_p)
            version = config().decode(errors="replace").split(" ")[1]
        except (AttributeError, IndexError):
            return None
        return Provider("openblas", str(lib._name), version, "pthreads", s, d, get, put)
    return None


def _mkl_paths() -> list[Path]:
    """Where ``libmkl_rt`` may be: the ``mkl`` wheel's files, then this environment's lib/."""
    found: list[Path] = []
    try:
        for f in importlib.metadata.files("mkl") or []:
            if f.name.startswith("libmkl_rt.so"):
                found.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    lib = Path(sys.prefix) / "lib"
    found += sorted(lib.glob("libmkl_rt.so*"), reverse=True)
    return [p for p in found if p.is_file()]


def _mkl() -> Provider | None:
    # Intel OpenMP's idle threads spin 200 ms after each parallel region by default: between
    # the step's GEMMs they then take the core from the elementwise passes, and on a shared
    # machine from other processes (measured under load on 2 cores: a step 1.6x slower than
    # with 0). Read when the runtime starts; a value the user set wins.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    for path in _mkl_paths():
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        s, d = _address(lib, "cblas_sgemm_64"), _address(lib, "cblas_dgemm_64")
        if not (s and d):
            continue
        threading = _mkl_threading(lib)  # before any other MKL call: the first one fixes it
        strict = _mkl_strict(lib)
        get = _int_function(lib, "MKL_Get_Max_Threads", [], ctypes.c_int)
        # the calling thread's own count: it wins over a process-wide one (threadpoolctl's)
        put = _int_function(lib, "MKL_Set_Num_Threads_Local", [ctypes.c_int], ctypes.c_int)
        buf = ctypes.create_string_buffer(256)
        _int_function(lib, "MKL_Get_Version_String", [ctypes.c_char_p, ctypes.c_int], None)(
            buf, 256
        )
        text = buf.value.decode(errors="replace")
        version = text.split("Version ", 1)[-1].split("-", 1)[0].strip() or text
        return Provider("mkl", str(path), version, threading, s, d, get, put, strict)
    return None


def _mkl_strict(lib: Any) -> bool:
    """MKL in its strict conditional numerical reproducibility mode (``MKL_CBWR=AUTO,STRICT``:
    the code path MKL picks for this CPU, with results that do not depend on the thread count;
    measured no slower on the step's shapes), unless the user set ``MKL_CBWR``. Whether set."""
    if os.environ.get("MKL_CBWR"):
        return "STRICT" in os.environ["MKL_CBWR"].upper()
    try:
        fn = _int_function(lib, "MKL_CBWR_Set", [ctypes.c_int], ctypes.c_int)
    except AttributeError:
        return False
    return bool(fn(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT) == _MKL_CBWR_SUCCESS)


def _mkl_threading(lib: Any) -> str:
    """Put MKL on GNU OpenMP where the Numba kernels run on it too (one pool, :mod:`.pool`),
    unless the user chose a layer; the layer, in words."""
    if os.environ.get("MKL_THREADING_LAYER"):
        return f"OpenMP ({os.environ['MKL_THREADING_LAYER']}, set by MKL_THREADING_LAYER)"
    if OMP:
        fn = _int_function(lib, "MKL_Set_Threading_Layer", [ctypes.c_int], ctypes.c_int)
        if fn(_MKL_THREADING_GNU) == _MKL_THREADING_GNU:
            return "OpenMP (GNU), one pool with the Numba kernels"
    return "OpenMP (Intel)"


def _choose() -> tuple[Provider | None, str]:
    """The provider and, when it is not MKL, what the user could install to get it."""
    forced = os.environ.get("GPUBP_GEMM", "").strip().lower()
    if forced and forced not in CHOICES:
        raise ValueError(
            f"GPUBP_GEMM={forced!r} is not a GEMM provider; expected one of {', '.join(CHOICES)}"
            " (or unset, to take the fastest found)"
        )
    if forced == "matmul":
        return None, "GPUBP_GEMM=matmul"
    if forced in ("", "mkl"):
        mkl = _mkl()
        if mkl is not None:
            return mkl, ""
        if forced == "mkl":
            raise ValueError(
                "GPUBP_GEMM=mkl but MKL was not found: pip install mkl (x86-64), or unset it"
            )
    hint = "pip install mkl (or 'gpubp[fast]') for faster GEMMs" if _x86() else ""
    return _openblas(), hint


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


PROVIDER, MISSING = _choose()
#: Whether the kernels can call a BLAS directly.
AVAILABLE: bool = PROVIDER is not None

if PROVIDER is not None:
    import llvmlite.binding as ll

    ll.add_symbol("gpubp_sgemm64", PROVIDER.sgemm)
    ll.add_symbol("gpubp_dgemm64", PROVIDER.dgemm)


def describe() -> str:
    """One line: the provider, its version and threads (``gpubp info``, the benchmarks)."""
    if PROVIDER is None:
        return f"numpy.matmul (no BLAS callable from the kernels; {MISSING})"
    line = f"{PROVIDER.name} {PROVIDER.version}, {PROVIDER.threading}, {PROVIDER.threads()} threads"
    if PROVIDER.same_at_any_threads:
        line += ", the same results at any thread count (MKL_CBWR strict)"
    return f"{line} ({MISSING})" if MISSING else line


def _gemm_type(real: Any) -> Any:
    i32, i64, p = types.int32, types.int64, types.intp
    return types.void(i32, i32, i32, i64, i64, i64, real, p, i64, p, i64, real, p, i64)


_sgemm = types.ExternalFunction("gpubp_sgemm64", _gemm_type(types.float32))
_dgemm = types.ExternalFunction("gpubp_dgemm64", _gemm_type(types.float64))


def blas_threads() -> int | None:
    """The provider's thread count, or None without a provider."""
    return None if PROVIDER is None else PROVIDER.threads()


def set_blas_threads(n: int) -> None:
    """Set the provider's thread count (process-wide, as ``threadpoolctl`` does)."""
    if PROVIDER is not None:
        PROVIDER.set_threads(int(n))


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
