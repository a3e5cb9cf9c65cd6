"""gpubp's own cuBLAS binding (ctypes), so that a train step can be captured as a CUDA graph.

CuPy's cuBLAS wrappers (``cupy_backends.cuda.libs.cublas``) set the handle's stream on every
call and refuse to run while a stream is capturing (``NotImplementedError('calling cuBLAS API
during stream capture is currently unsupported')``, CuPy 13.6 to 14.2). This module calls
``libcublas`` itself, as PyTorch does: its own handle per device, the stream set before capture
begins, pointer mode DEVICE (``alpha``/``beta`` are read from device memory, so a captured graph
reads their current values) and a preallocated workspace given with ``cublasSetWorkspace_v2``, so
a captured GEMM allocates nothing.

Importing this module needs neither CuPy, nor cuBLAS, nor a GPU: the library is loaded when the
first :class:`Cublas` is made. ``PROTOTYPES`` is checked against ``cublas_api.h`` by
``tests/test_cublas_binding.py`` (no GPU runs this code in CI).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import CublasError

# --- constants (cublas_api.h, library_types.h); fixed by the CUDA ABI -----------------------------
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1
CUDA_R_32F, CUDA_R_64F = 0, 1
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 70, 77
CUBLAS_GEMM_DEFAULT = -1

#: ``cublasStatus_t`` values and their names, for error messages.
STATUS_NAMES: dict[int, str] = {
    0: "CUBLAS_STATUS_SUCCESS",
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    11: "CUBLAS_STATUS_MAPPING_ERROR",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
    16: "CUBLAS_STATUS_LICENSE_ERROR",
}

#: Bytes of the workspace given to each handle (NVIDIA's recommendation for Hopper; the others
#: need at most 4 MiB).
WORKSPACE_BYTES = 32 * 1024 * 1024

_status = ctypes.c_int  # cublasStatus_t (an enum)
_enum = ctypes.c_int  # cublasOperation_t, cublasPointerMode_t, cudaDataType, ...
_ptr = ctypes.c_void_p  # cublasHandle_t, cudaStream_t, T*, const void*

# cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa,
#     cublasOperation_t transb, int m, int n, int k, const void* alpha,
#     const void* A, cudaDataType Atype, int lda, const void* B, cudaDataType Btype, int ldb,
#     const void* beta, void* C, cudaDataType Ctype, int ldc,
#     cublasComputeType_t computeType, cublasGemmAlgo_t algo)
_GEMM_EX_ARGS: list[Any] = [
    _ptr, _enum, _enum, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    _ptr,
    _ptr, _enum, ctypes.c_int,
    _ptr, _enum, ctypes.c_int,
    _ptr,
    _ptr, _enum, ctypes.c_int,
    _enum, _enum,
]  # fmt: skip

#: Every cuBLAS function gpubp calls: name -> ``(restype, argtypes)``, from ``cublas_api.h``.
PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # cublasStatus_t cublasCreate_v2(cublasHandle_t* handle)
    "cublasCreate_v2": (_status, [_ptr]),
    # cublasStatus_t cublasDestroy_v2(cublasHandle_t handle)
    "cublasDestroy_v2": (_status, [_ptr]),
    # cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t streamId)
    "cublasSetStream_v2": (_status, [_ptr, _ptr]),
    # cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t handle, cublasPointerMode_t mode)
    "cublasSetPointerMode_v2": (_status, [_ptr, _enum]),
    # cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace,
    #                                      size_t workspaceSizeInBytes)
    "cublasSetWorkspace_v2": (_status, [_ptr, _ptr, ctypes.c_size_t]),
    # cublasGemmEx: see _GEMM_EX_ARGS
    "cublasGemmEx": (_status, _GEMM_EX_ARGS),
}

_INSTALL = (
    "install it with pip install 'cupy-cuda12x[ctk]' (or 'cupy-cuda13x[ctk]'), or set "
    "GPUBP_CUBLAS to libcublas.so's path"
)


def _is_cublas(name: str) -> bool:
    """``libcublas.so[.N...]`` and not ``libcublasLt``."""
    return name == "libcublas.so" or name.startswith("libcublas.so.")


def _loaded_in_process(major: int | None = None) -> str | None:
    """Path of a ``libcublas.so`` this process has loaded already (CuPy loads it), if any; with
    ``major``, one of that CUDA major version (``libcublas.so.<major>``) first."""
    try:
        with open("/proc/self/maps") as maps:
            found: list[str] = []
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if path.startswith("/") and _is_cublas(os.path.basename(path)):
                    if path not in found:
                        found.append(path)
    except OSError:  # not Linux
        return None
    if major is not None:
        for path in found:
            if os.path.basename(path).startswith(f"libcublas.so.{major}"):
                return path
    return found[0] if found else None


def _in_wheels() -> str | None:
    """``libcublas.so.*`` from the NVIDIA wheels (CuPy's ``[ctk]`` extra): CUDA 12, then 13."""
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        # nvidia-cublas-cu12: nvidia/cublas/lib; nvidia-cublas 13.x: nvidia/cu13/lib
        for folder in (Path(root) / "cublas" / "lib", *sorted(Path(root).glob("cu*/lib"))):
            found = sorted(p for p in folder.glob("libcublas.so*") if _is_cublas(p.name))
            if found:
                return str(found[-1])
    return None


def cupy_cublas() -> tuple[str | None, str | None]:
    """``(path, why)``: the ``libcublas`` CuPy itself loaded, or ``None`` and why there is none.

    CuPy is imported as a package first (CuPy 14 preloads the CUDA wheels' libraries there,
    through ``cuda.pathfinder``), then its own cuBLAS module (``from cupy_backends.cuda.libs
    import cublas``), which loads the ``libcublas`` of CuPy's CUDA version; the path is then read
    from the process's memory map, of CuPy's CUDA major version where two are loaded (PyTorch
    brings its own). ``why`` starts with ``"no CuPy"`` where CuPy cannot be imported at all.
    """
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:
        return None, f"no CuPy ({type(exc).__name__}: {exc})"
    try:
        from cupy_backends.cuda.libs import cublas as _cupy_cublas  # noqa: F401
    except Exception as exc:
        return None, f"CuPy's cuBLAS module did not load ({type(exc).__name__}: {exc})"
    try:
        major: int | None = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # no driver: any copy CuPy loaded
        major = None
    path = _loaded_in_process(major)
    if path is None:
        return None, "CuPy's cuBLAS module loaded, but no libcublas.so is in the process's map"
    return path, None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def find_library() -> str:
    """Path (or soname) of the cuBLAS shared library to load: the one CuPy uses.

    :func:`cupy_cublas` (CuPy's own copy, as CuPy loads it); ``GPUBP_CUBLAS`` may name that same
    file, and another copy is refused (:class:`CublasError`: two cuBLAS copies in one process
    would each keep their own state, and a copy of another CUDA version may not run CuPy's
    streams). Without CuPy at all: ``GPUBP_CUBLAS``, then the NVIDIA wheels
    (``nvidia/cublas/lib``, ``nvidia/cu13/lib``), then ``ctypes.util.find_library("cublas")``.
    Raises :class:`FileNotFoundError` saying what to install if none is found, or if CuPy is
    there but its cuBLAS did not load (no other copy is taken in its place).
    """
    explicit = os.environ.get("GPUBP_CUBLAS")
    if explicit and not Path(explicit).is_file():
        raise FileNotFoundError(f"GPUBP_CUBLAS={explicit!r} is not a file")
    path, why = cupy_cublas()
    if path is not None:
        if explicit and not _same_file(explicit, path):
            raise CublasError(
                f"GPUBP_CUBLAS={explicit!r} is not the libcublas CuPy uses ({path}); gpubp "
                "calls the copy CuPy loaded, so that one process has one cuBLAS: unset "
                f"GPUBP_CUBLAS or set it to {path}"
            )
        return path
    if explicit:
        return explicit
    if why is not None and not why.startswith("no CuPy"):
        raise FileNotFoundError(
            f"the cuBLAS library CuPy uses could not be loaded: {why}; {_INSTALL}"
        )
    found = _in_wheels() or ctypes.util.find_library("cublas")
    if not found:
        raise FileNotFoundError(f"the cuBLAS library (libcublas.so) was not found; {_INSTALL}")
    return found


@functools.cache
def load_library(path: str | None = None) -> Any:
    """The cuBLAS library loaded with ctypes, every function of :data:`PROTOTYPES` typed."""
    lib = ctypes.CDLL(path or find_library())
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


def library_for(cupy_module: Any) -> Any:
    """The cuBLAS C functions to use with ``cupy_module``: its own ``libcublas()`` where a
    stand-in for CuPy brings one (same functions, same calling convention as :class:`Cublas`
    describes), else the real library (:func:`load_library`)."""
    own = getattr(cupy_module, "libcublas", None)
    return own() if own is not None else load_library()


def rowmajor_gemm(
    trans_a: bool, trans_b: bool, M: int, N: int, K: int, lda: int, ldb: int, ldc: int
) -> tuple[int, int, int, int, int, str, int, str, int, int]:
    """cuBLAS (column-major) arguments for the row-major ``C (M, N) = op(A) @ op(B)``.

    A row-major matrix is its transpose in column-major order, so ``C.T = op(B).T @ op(A).T``
    is computed with the operands swapped. ``lda``/``ldb``/``ldc`` are the row-major row lengths
    of the stored ``A``, ``B``, ``C``. Returns ``(transa, transb, m, n, k, first, ld_first,
    second, ld_second, ldc)`` where ``first``/``second`` name which of ``"A"``, ``"B"`` goes in
    cuBLAS's A and B slots.
    """
    return (
        CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
        CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
        N,
        M,
        K,
        "B",
        ldb,
        "A",
        lda,
        ldc,
    )


_INT_MAX = 2**31 - 1


class Cublas:
    """One cuBLAS handle (for the device current when it is made), typed for gpubp's GEMMs.

    Made once per device: the handle, pointer mode DEVICE, and a workspace of
    ``workspace_bytes`` allocated from ``cupy_module`` and given with ``cublasSetWorkspace_v2``
    (again after every ``cublasSetStream_v2``, which resets it to cuBLAS's own pool).

    Parameters
    ----------
    cupy_module : module
        ``cupy`` or a module that behaves like it (``empty`` and ``cuda.get_current_stream`` are
        used).
    lib : object, optional
        The library: anything whose attributes are the cuBLAS C functions of
        :data:`PROTOTYPES`. ``None``: :func:`library_for` ``cupy_module`` (its own
        ``libcublas()`` if it is a stand-in that has one, else the real ``libcublas`` through
        ctypes).
    workspace_bytes : int
        Size of the preallocated workspace.

    Notes
    -----
    The calling convention a stand-in ``lib`` must accept: every function returns an ``int``
    status (0 is success); handles, stream pointers, device pointers and enums are plain Python
    ``int``; the one exception is ``cublasCreate_v2(ctypes.byref(handle))`` with ``handle`` a
    ``ctypes.c_void_p`` that the function sets. ``cublasGemmEx`` gets ``alpha`` and ``beta`` as
    DEVICE pointers (ints; pointer mode DEVICE is set right after the handle is made), and the
    operands as column-major device pointers with leading dimensions, exactly as in
    ``cublas_api.h``.
    """

    def __init__(
        self, cupy_module: Any, lib: Any = None, workspace_bytes: int = WORKSPACE_BYTES
    ) -> None:
        if lib is None:
            lib = library_for(cupy_module)
        self._lib = lib
        self._cp = cupy_module
        handle = ctypes.c_void_p()
        self._check("cublasCreate_v2", lib.cublasCreate_v2(ctypes.byref(handle)))
        self.handle: int = int(handle.value or 0)
        self._check(
            "cublasSetPointerMode_v2",
            lib.cublasSetPointerMode_v2(self.handle, CUBLAS_POINTER_MODE_DEVICE),
        )
        self.workspace = cupy_module.empty(int(workspace_bytes), dtype=np.uint8)
        self.workspace_bytes = int(workspace_bytes)
        self._set_workspace()
        self.stream: int | None = None

    @staticmethod
    def _check(function: str, status: int) -> None:
        if status != 0:
            name = STATUS_NAMES.get(int(status), "unknown status")
            raise CublasError(f"{function} failed with status {int(status)} ({name})")

    def _set_workspace(self) -> None:
        self._check(
            "cublasSetWorkspace_v2",
            self._lib.cublasSetWorkspace_v2(
                self.handle, int(self.workspace.data.ptr), self.workspace_bytes
            ),
        )

    def set_stream(self, stream_ptr: int) -> None:
        """Make the handle's GEMMs run on the stream ``stream_ptr`` (a no-op if they do already).

        A host-side call: do it before a capture begins, never during one (the captured step then
        calls only ``cublasGemmEx``). The workspace is given again, since ``cublasSetStream_v2``
        resets it.
        """
        stream_ptr = int(stream_ptr)
        if stream_ptr == self.stream:
            return
        self._check("cublasSetStream_v2", self._lib.cublasSetStream_v2(self.handle, stream_ptr))
        self._set_workspace()
        self.stream = stream_ptr

    def gemm(
        self,
        trans_a: bool,
        trans_b: bool,
        A: Any,
        B: Any,
        C: Any,
        alpha_ptr: int,
        beta_ptr: int,
        tf32: bool = False,
    ) -> Any:
        """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` by ``cublasGemmEx``; returns ``C``.

        ``op(A)`` is ``(M, K)`` (``A`` is ``(K, M)`` if ``trans_a``), ``op(B)`` is ``(K, N)``
        (``B`` is ``(N, K)`` if ``trans_b``), ``C`` is ``(M, N)``: C-contiguous 2-D device arrays
        of one dtype, float32 or float64. ``alpha_ptr``/``beta_ptr``: device addresses of scalars
        of that dtype. ``tf32``: allow TF32 tensor cores for float32. Runs on the handle's stream
        (:meth:`set_stream`).
        """
        M, K = (A.shape[1], A.shape[0]) if trans_a else A.shape
        Kb, N = (B.shape[1], B.shape[0]) if trans_b else B.shape
        if K != Kb or tuple(C.shape) != (M, N):
            raise ValueError(
                f"gemm: op(A) {(M, K)} @ op(B) {(Kb, N)} does not give C {tuple(C.shape)} "
                f"(trans_a={trans_a}, trans_b={trans_b})"
            )
        dt = C.dtype
        for name, x in (("A", A), ("B", B), ("C", C)):
            if x.dtype != dt or dt not in (np.float32, np.float64):
                raise TypeError(
                    f"gemm: {name} is {x.dtype}; expected A, B and C all float32 or all float64"
                )
            if not x.flags.c_contiguous:
                raise ValueError(f"gemm: {name} must be C-contiguous (use ascontiguousarray)")
        if max(M, N, K, A.shape[1], B.shape[1]) > _INT_MAX:
            raise ValueError(f"gemm: a dimension of {(M, N, K)} exceeds cuBLAS's int range")
        if M == 0 or N == 0:
            return C
        if dt == np.float64:
            data, compute = CUDA_R_64F, CUBLAS_COMPUTE_64F
        else:
            data = CUDA_R_32F
            compute = CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else CUBLAS_COMPUTE_32F
        ta, tb, m, n, k, first, ldf, _, lds, ldc = rowmajor_gemm(
            trans_a, trans_b, M, N, K, A.shape[1], B.shape[1], C.shape[1]
        )
        x, y = (B, A) if first == "B" else (A, B)
        # cuBLAS wants every leading dimension >= 1, also for an empty K
        ldf, lds, ldc = max(1, ldf), max(1, lds), max(1, ldc)
        self._check(
            "cublasGemmEx",
            self._lib.cublasGemmEx(
                self.handle, ta, tb, m, n, k, int(alpha_ptr), int(x.data.ptr), data, ldf,
                int(y.data.ptr), data, lds, int(beta_ptr), int(C.data.ptr), data, ldc, compute,
                CUBLAS_GEMM_DEFAULT,
            ),
        )  # fmt: skip
        return C

    def close(self) -> None:
        """Destroy the handle (not done at exit: the CUDA context may be gone by then)."""
        if self.handle:
            handle, self.handle = self.handle, 0
            self._check("cublasDestroy_v2", self._lib.cublasDestroy_v2(handle))
