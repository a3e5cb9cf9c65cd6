"""gpubp's cuBLAS binding without a GPU: every ctypes prototype against ``cublas_api.h`` (names,
argument count, C types, return type), the row-major -> column-major GEMM mapping through
:class:`Cublas` on a NumPy stand-in of the library, and the library search.

The headers of CUDA 12 and 13 (every check runs against both) come from
``GPUBP_CUBLAS_HEADER`` or the installed ``nvidia-cublas-cu12`` / ``nvidia-cublas`` wheels
(``benchmarks/fetch_cublas_header.py`` fetches them for CI); without one the header tests skip,
unless ``GPUBP_REQUIRE_EMULATOR=1``, which makes a missing header a failure.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import os
import re
import types
from pathlib import Path

import numpy as np
import pytest

from gpubp.backends.cuda import cublas, launch
from gpubp.backends.cuda.catalogue import HP, HP_SLOTS

# --- the header -----------------------------------------------------------------------------------


#: Where each CUDA version's wheel puts the header, below the ``nvidia`` namespace package.
HEADER_PLACES = {"cuda12": "cublas/include/cublas_api.h", "cuda13": "cu13/include/cublas_api.h"}


def _find_header(version: str) -> Path | None:
    """``version``'s header: from ``GPUBP_CUBLAS_HEADER`` (paths joined by os.pathsep), else an
    installed wheel."""
    place = HEADER_PLACES[version]
    explicit = os.environ.get("GPUBP_CUBLAS_HEADER")
    if explicit:
        paths = [Path(p) for p in explicit.split(os.pathsep) if p]
        return next((p for p in paths if p.as_posix().endswith(place)), None)
    spec = importlib.util.find_spec("nvidia")
    for root in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / place
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="module", params=sorted(HEADER_PLACES))
def header(request: pytest.FixtureRequest) -> str:
    path = _find_header(request.param)
    if path is None or not path.is_file():
        why = (
            f"the {request.param} cublas_api.h was not found (GPUBP_CUBLAS_HEADER="
            f"{os.environ.get('GPUBP_CUBLAS_HEADER')!r}, no wheel installed); fetch both with "
            "python benchmarks/fetch_cublas_header.py DIR"
        )
        if os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path.read_text()


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def declarations(src: str) -> dict[str, tuple[str, list[str]]]:
    """Exported functions of the header: name -> (return type, [parameter types])."""
    decls = {}
    # CUDA 12 writes "CUBLASAPI cublasStatus_t CUBLASWINAPI f(...)"; CUDA 13 drops CUBLASAPI
    pattern = r"(?:CUBLASAPI\s+)?\b(\w[\w\s\*]*?)\s+CUBLASWINAPI\s+(\w+)\s*\(([^)]*)\)\s*;"
    for ret, name, params in re.findall(pattern, _strip_comments(src)):
        types_ = []
        for p in params.split(","):
            p = " ".join(p.replace("*", " * ").split())
            if p in ("void", ""):
                continue
            words = p.split()
            # drop the parameter's name (the last identifier, unless the type is all there is)
            if len(words) > 1 and re.fullmatch(r"\w+", words[-1]):
                words = words[:-1]
            types_.append(" ".join(words))
        decls[name] = (" ".join(ret.split()), types_)
    return decls


#: Types that cublas_api.h uses but other CUDA headers define (driver_types.h, library_types.h).
_OUTSIDE = {
    "cudaStream_t": "pointer",
    "cudaDataType": "enum",
    "cudaDataType_t": "enum",
    "libraryPropertyType": "enum",
    "int": "int",
    "size_t": "size_t",
}


def type_kinds(src: str) -> dict[str, str]:
    """C type name -> ``enum`` / ``pointer`` / ``int`` / ``size_t``, from the header's typedefs."""
    src = _strip_comments(src)
    kinds = dict(_OUTSIDE)
    for name in re.findall(r"typedef\s+enum\s*\w*\s*\{[^}]*\}\s*(\w+)\s*;", src):
        kinds[name] = "enum"
    for name in re.findall(r"typedef\s+struct\s+\w+\s*\*\s*(\w+)\s*;", src):
        kinds[name] = "pointer"
    for old, new in re.findall(r"typedef\s+(\w+)\s+(\w+)\s*;", src):
        if old in kinds:
            kinds[new] = kinds[old]
    return kinds


_CTYPES = {
    "enum": ctypes.c_int,
    "int": ctypes.c_int,
    "size_t": ctypes.c_size_t,
    "pointer": ctypes.c_void_p,
}


def ctype_of(c_type: str, kinds: dict[str, str]) -> object:
    """The ctypes type a C parameter type maps to (any pointer -> ``c_void_p``)."""
    if "*" in c_type:
        return ctypes.c_void_p
    base = c_type.replace("const", "").strip()
    if base not in kinds:
        raise KeyError(f"C type {c_type!r} is not known to the test")
    return _CTYPES[kinds[base]]


def prototype_problems(name: str, proto: tuple, src: str) -> list[str]:
    """What is wrong with ``PROTOTYPES[name] = proto`` according to the header ``src``."""
    decls, kinds = declarations(src), type_kinds(src)
    if name not in decls:
        return [f"{name} is not declared in cublas_api.h"]
    ret, params = decls[name]
    restype, argtypes = proto
    problems = []
    if ctype_of(ret, kinds) is not restype:
        problems.append(f"{name} returns {ret}, not {restype.__name__}")
    if len(params) != len(argtypes):
        problems.append(f"{name} takes {len(params)} arguments, not {len(argtypes)}")
    for i, (c_type, got) in enumerate(zip(params, argtypes)):
        want = ctype_of(c_type, kinds)
        if want is not got:
            problems.append(
                f"{name} argument {i} is {c_type} ({want.__name__}), not {got.__name__}"
            )
    return problems


@pytest.mark.parametrize("name", list(cublas.PROTOTYPES))
def test_prototype_matches_the_header(header, name):
    assert prototype_problems(name, cublas.PROTOTYPES[name], header) == []


def test_the_header_check_catches_wrong_prototypes(header):
    ok = cublas.PROTOTYPES["cublasSetWorkspace_v2"]
    assert prototype_problems("cublasSetWorkspace_v2", ok, header) == []
    restype, args = ok
    swapped = (restype, [args[0], args[1], ctypes.c_int])  # size_t declared as int
    assert prototype_problems("cublasSetWorkspace_v2", swapped, header)
    assert prototype_problems("cublasSetWorkspace_v2", (restype, args[:2]), header)
    assert prototype_problems("cublasSetWorkspace_v2", (ctypes.c_void_p, args), header)
    assert prototype_problems("cublasSetWorkspace", ok, header)  # no such exported name
    gemm_restype, gemm_args = cublas.PROTOTYPES["cublasGemmEx"]
    bad = list(gemm_args)
    bad[6] = ctypes.c_int  # alpha is a pointer
    assert prototype_problems("cublasGemmEx", (gemm_restype, bad), header)


def _enum_values(src: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"\b(CUBLAS_\w+)\s*=\s*(-?\d+)", _strip_comments(src))}


def test_constants_match_the_header(header):
    values = _enum_values(header)
    for name in (
        "CUBLAS_OP_N",
        "CUBLAS_OP_T",
        "CUBLAS_POINTER_MODE_HOST",
        "CUBLAS_POINTER_MODE_DEVICE",
        "CUBLAS_COMPUTE_32F",
        "CUBLAS_COMPUTE_64F",
        "CUBLAS_COMPUTE_32F_FAST_TF32",
        "CUBLAS_GEMM_DEFAULT",
    ):
        assert values[name] == getattr(cublas, name), name
    statuses = {v: k for k, v in values.items() if k.startswith("CUBLAS_STATUS_")}
    assert statuses == cublas.STATUS_NAMES


# --- the GEMM mapping, through Cublas on a NumPy stand-in of libcublas ----------------------------


class HostArray(np.ndarray):
    """A NumPy array posing as a device array (``.data.ptr`` is its host address)."""

    @property
    def data(self):  # type: ignore[override]
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


def _host(a: np.ndarray) -> HostArray:
    return np.ascontiguousarray(a).view(HostArray)


_DTYPES = {cublas.CUDA_R_32F: np.float32, cublas.CUDA_R_64F: np.float64}


def _colmajor(ptr: int, dtype, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major ``(rows, cols)`` matrix with leading dimension ``ld`` at ``ptr``."""
    item = np.dtype(dtype).itemsize
    count = ld * (cols - 1) + rows if cols and rows else 0
    buf = np.frombuffer((ctypes.c_char * (count * item)).from_address(ptr), dtype=dtype)
    return np.lib.stride_tricks.as_strided(buf, (rows, cols), (item, item * ld))


class FakeLib:
    """libcublas's C functions on host memory, with the calling convention Cublas documents."""

    def __init__(self, fail: str | None = None):
        self.calls: list[tuple] = []
        self.fail = fail
        self.mode = cublas.CUBLAS_POINTER_MODE_HOST

    def _status(self, name):
        return 13 if name == self.fail else 0

    def cublasCreate_v2(self, ref):
        ref._obj.value = 0xC0FFEE
        self.calls.append(("create",))
        return self._status("cublasCreate_v2")

    def cublasDestroy_v2(self, handle):
        self.calls.append(("destroy", handle))
        return self._status("cublasDestroy_v2")

    def cublasSetPointerMode_v2(self, handle, mode):
        assert isinstance(handle, int) and isinstance(mode, int)
        self.mode = mode
        self.calls.append(("mode", mode))
        return self._status("cublasSetPointerMode_v2")

    def cublasSetWorkspace_v2(self, handle, ptr, size):
        assert all(isinstance(v, int) for v in (handle, ptr, size))
        self.calls.append(("workspace", ptr, size))
        return self._status("cublasSetWorkspace_v2")

    def cublasSetStream_v2(self, handle, stream):
        assert isinstance(stream, int)
        self.calls.append(("stream", stream))
        return self._status("cublasSetStream_v2")

    def cublasGemmEx(self, handle, ta, tb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta,
                     C, Ctype, ldc, compute, algo):  # fmt: skip
        args = (handle, ta, tb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc)
        assert all(isinstance(v, int) for v in args)
        assert self.mode == cublas.CUBLAS_POINTER_MODE_DEVICE and algo == -1
        assert Atype == Btype == Ctype
        dt = _DTYPES[Ctype]
        a = _colmajor(A, dt, k, m, lda).T if ta else _colmajor(A, dt, m, k, lda)
        b = _colmajor(B, dt, n, k, ldb).T if tb else _colmajor(B, dt, k, n, ldb)
        c = _colmajor(C, dt, m, n, ldc)
        al, be = _colmajor(alpha, dt, 1, 1, 1)[0, 0], _colmajor(beta, dt, 1, 1, 1)[0, 0]
        c[...] = al * (a @ b) + be * c
        self.calls.append(("gemm", compute))
        return self._status("cublasGemmEx")


def _fake_cupy(**extra):
    stream = types.SimpleNamespace(ptr=0)
    return types.SimpleNamespace(
        empty=lambda n, dtype: _host(np.zeros(n, dtype)),
        cuda=types.SimpleNamespace(get_current_stream=lambda: stream),
        **extra,
    )


def test_handle_is_made_in_device_pointer_mode_with_a_workspace():
    lib = FakeLib()
    blas = cublas.Cublas(_fake_cupy(), lib=lib, workspace_bytes=4096)
    assert blas.handle == 0xC0FFEE
    assert lib.calls == [
        ("create",),
        ("mode", cublas.CUBLAS_POINTER_MODE_DEVICE),
        ("workspace", blas.workspace.data.ptr, 4096),
    ]
    lib.calls.clear()
    blas.set_stream(1234)
    assert lib.calls == [("stream", 1234), ("workspace", blas.workspace.data.ptr, 4096)]
    lib.calls.clear()
    blas.set_stream(1234)  # unchanged: nothing is called (legal during a capture)
    assert lib.calls == []
    blas.close()
    assert lib.calls == [("destroy", 0xC0FFEE)]


def test_a_stand_in_cupy_brings_its_own_library():
    lib = FakeLib()
    blas = cublas.Cublas(_fake_cupy(libcublas=lambda: lib))
    assert blas._lib is lib and lib.calls[0] == ("create",)


@pytest.mark.parametrize("function", ["cublasCreate_v2", "cublasSetWorkspace_v2", "cublasGemmEx"])
def test_a_failing_status_names_the_function_and_status(function):
    lib = FakeLib(fail=function)
    with pytest.raises(cublas.CublasError, match=rf"{function} failed with status 13 \(CUBLAS_S"):
        blas = cublas.Cublas(_fake_cupy(), lib=lib)
        a = _host(np.ones((2, 2)))
        hp = _host(np.ones(2))
        blas.gemm(False, False, a, a, _host(np.ones((2, 2))), hp.data.ptr, hp.data.ptr + 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product((False, True), repeat=2)))
def test_rowmajor_gemm_through_cublas_equals_numpy(trans_a, trans_b, dtype, rng):
    M, N, K = 5, 3, 7
    A = rng.normal(size=(K, M) if trans_a else (M, K)).astype(dtype)
    B = rng.normal(size=(N, K) if trans_b else (K, N)).astype(dtype)
    C0 = rng.normal(size=(M, N)).astype(dtype)
    hp = np.zeros(HP_SLOTS, dtype)
    hp[HP["NEG_LR"]], hp[HP["ONE"]] = -0.5, 1.0
    expected = -0.5 * ((A.T if trans_a else A) @ (B.T if trans_b else B)) + C0
    lib = FakeLib()
    blas = cublas.Cublas(_fake_cupy(), lib=lib)
    C = _host(C0)
    launch.gemm(blas, trans_a, trans_b, _host(A), _host(B), C, "NEG_LR", "ONE", _host(hp))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(np.asarray(C), expected, rtol=tol, atol=tol)
    want = cublas.CUBLAS_COMPUTE_32F if dtype == np.float32 else cublas.CUBLAS_COMPUTE_64F
    assert lib.calls[-1] == ("gemm", want)


def test_tf32_is_asked_for_only_in_float32():
    lib = FakeLib()
    blas = cublas.Cublas(_fake_cupy(), lib=lib)
    for dtype in (np.float32, np.float64):
        a, c = _host(np.ones((2, 2), dtype)), _host(np.zeros((2, 2), dtype))
        hp = _host(np.ones(HP_SLOTS, dtype))
        launch.gemm(blas, False, False, a, a, c, "ONE", "ZERO", hp, tf32=True)
    assert [c for c in lib.calls if c[0] == "gemm"] == [
        ("gemm", cublas.CUBLAS_COMPUTE_32F_FAST_TF32),
        ("gemm", cublas.CUBLAS_COMPUTE_64F),
    ]


def test_gemm_refuses_what_cublas_cannot_take():
    blas = cublas.Cublas(_fake_cupy(), lib=FakeLib())
    hp = _host(np.ones(HP_SLOTS))
    a = _host(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"does not give C \(2, 2\)"):
        launch.gemm(blas, False, False, a, a, _host(np.ones((2, 2))), "ONE", "ZERO", hp)
    with pytest.raises(TypeError, match="all float32 or all float64"):
        launch.gemm(blas, False, True, a, _host(np.ones((2, 3), np.float32)),
                    _host(np.ones((2, 2))), "ONE", "ZERO", hp)  # fmt: skip
    with pytest.raises(ValueError, match="C-contiguous"):
        at = np.ones((3, 2)).T.view(HostArray)
        blas.gemm(False, False, at, _host(np.ones((3, 2))), _host(np.ones((2, 2))), 0, 0)
    with pytest.raises(ValueError, match="not a hyper-parameter slot"):
        launch.gemm(blas, False, True, a, a, _host(np.ones((2, 2))), "TWO", "ZERO", hp)


# --- finding the library --------------------------------------------------------------------------


def test_library_search_order_and_the_error_without_one(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUBP_CUBLAS", raising=False)
    monkeypatch.setattr(cublas, "cupy_cublas", lambda: (None, "no CuPy (ImportError)"))
    lib_dir = tmp_path / "nvidia" / "cublas" / "lib"
    lib_dir.mkdir(parents=True)
    for name in ("libcublasLt.so.12", "libcublas.so.12"):
        (lib_dir / name).write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert cublas.find_library() == str(lib_dir / "libcublas.so.12")  # no CuPy: the wheels
    monkeypatch.setattr(cublas, "_in_wheels", lambda: None)
    monkeypatch.setattr(cublas.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install 'cupy-cuda12x\[ctk\]'"):
        cublas.find_library()
    monkeypatch.setenv("GPUBP_CUBLAS", str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="GPUBP_CUBLAS"):
        cublas.find_library()


def test_the_library_is_the_one_cupy_loaded_and_no_other(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUBP_CUBLAS", raising=False)
    ours, other = tmp_path / "libcublas.so.13", tmp_path / "libcublas.so.12"
    for f in (ours, other):
        f.write_bytes(b"")
    monkeypatch.setattr(cublas, "_in_wheels", lambda: str(other))  # never taken beside CuPy
    monkeypatch.setattr(cublas, "cupy_cublas", lambda: (str(ours), None))
    assert cublas.find_library() == str(ours)
    monkeypatch.setenv("GPUBP_CUBLAS", str(ours))
    assert cublas.find_library() == str(ours)  # the same file: fine
    monkeypatch.setenv("GPUBP_CUBLAS", str(other))
    with pytest.raises(cublas.CublasError, match=r"is not the libcublas CuPy uses.*unset"):
        cublas.find_library()
    # CuPy is there but its cuBLAS did not load: an error, not another copy in its place
    monkeypatch.delenv("GPUBP_CUBLAS")
    monkeypatch.setattr(cublas, "cupy_cublas", lambda: (None, "CuPy's cuBLAS module did not load"))
    with pytest.raises(FileNotFoundError, match=r"CuPy uses could not be loaded.*did not load"):
        cublas.find_library()


def test_of_two_loaded_copies_the_one_of_cupys_cuda_version(monkeypatch, tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 0 08:01 1 /opt/torch/lib/libcublas.so.12\n"
        "7f02-7f03 r-xp 0 08:01 2 /opt/nvidia/cu13/lib/libcublas.so.13\n"
        "7f04-7f05 r-xp 0 08:01 3 /opt/nvidia/cu13/lib/libcublasLt.so.13\n"
    )
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda f, *a, **k: real_open(maps if f == "/proc/self/maps" else f, *a, **k),
    )
    assert cublas._loaded_in_process(13) == "/opt/nvidia/cu13/lib/libcublas.so.13"
    assert cublas._loaded_in_process(12) == "/opt/torch/lib/libcublas.so.12"
    assert cublas._loaded_in_process() == "/opt/torch/lib/libcublas.so.12"


def test_only_libcublas_counts_not_libcublaslt():
    assert cublas._is_cublas("libcublas.so.12")
    assert cublas._is_cublas("libcublas.so")
    assert not cublas._is_cublas("libcublasLt.so.12")
