"""The emulated CuPy (cudaemu.cupy): array manners, capture and replay, the
C-level cuBLAS against NumPy, CuPy's cuBLAS wrappers refusing capture, NCCL over (fake) MPI.

Launches go through the CPU kernel emulator; those tests skip when it cannot build (no C++
compiler), and fail instead when ``GPUBP_REQUIRE_EMULATOR=1`` (CI).
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import types

import numpy as np
import pytest

from cudaemu import _nccl
from cudaemu import cupy as cp
from gpubp.backends.base import Backend
from gpubp.check import random_problem
from gpubp.optim import SGD, Adam

KERNEL = r"""
template <typename T>
__global__ void axpb(T* x, long long n, T a, T b) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = a * x[i] + b;
}
"""
NAMES = ["axpb<float>", "axpb<double>"]
OP_N, OP_T = 0, 1
R32F, R64F = 0, 1
COMPUTE = {np.float32: 68, np.float64: 70}
CODE = {np.float32: R32F, np.float64: R64F}


@pytest.fixture(autouse=True)
def _clean() -> None:
    cp.reset_stats()
    yield
    for s in list(cp._capturing):  # a failed test must not leave a capture open for the next
        s._ops = None
        cp._capturing.remove(s)


@pytest.fixture(scope="module")
def axpb() -> cp.RawModule:
    why = None
    try:
        from cudaemu import kernels
    except ImportError as exc:
        why = f"the kernel emulator cannot be imported: {exc}"
    else:
        why = kernels.compiler_missing()
    if why is not None:
        if os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1":
            pytest.fail(why)
        pytest.skip(why)
    mod = cp.RawModule(code=KERNEL, name_expressions=NAMES)
    mod.get_function("axpb<float>")  # compile once, outside any capture
    return mod


# --- arrays -------------------------------------------------------------------------------------


def test_implicit_conversion_to_numpy_raises_like_cupy():
    a = cp.zeros(3)
    msg = (
        "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
        "a NumPy array explicitly."
    )
    with pytest.raises(TypeError) as err:
        np.asarray(a)
    assert str(err.value) == msg
    with pytest.raises(TypeError):
        np.array([a, a])
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(3)  # CuPy never mixes host and device arrays
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.maximum(a, np.ones(3))


def test_arrays_copy_in_share_views_and_count_reads():
    host = np.arange(12.0).reshape(3, 4)
    a = cp.asarray(host)
    host[0, 0] = 99  # asarray copied host -> device
    assert cp.stats["h2d"] == 1
    assert a.data.ptr % cp.ALIGN == 0
    row = a[1]
    row[...] = -1  # a view shares memory
    a[2, 1:3] = cp.asarray(np.array([7.0, 8.0]))
    assert a.get().tolist() == [[0, 1, 2, 3], [-1, -1, -1, -1], [8, 7, 8, 11]]
    assert a[0, 0].ndim == 0 and isinstance(a[0, 0], cp.ndarray)  # 0-d views, not scalars
    assert a.reshape(-1).data.ptr == a.data.ptr and a.T.data.ptr == a.data.ptr
    assert cp.asarray(a) is a and cp.ascontiguousarray(a) is a
    cp.reset_stats()
    s = cp.sum(a)
    assert isinstance(s, cp.ndarray) and s.shape == ()  # reductions stay on the device
    assert cp.stats["get"] == 0
    assert float(s) == 36
    assert int(a[0, 1]) == 1 and bool(a[0, 1] == 1)
    assert cp.stats["get"] == 3


def test_operators_dtypes_and_out():
    a = cp.asarray(np.array([1.0, -2.0, 3.0], np.float32))
    assert (np.float32(2) * a).dtype == np.float32  # NumPy scalars on the left defer to us
    assert ((1.0 - a) / 2).get().tolist() == [0.0, 1.5, -1.0]
    assert (a > 0).get().tolist() == [True, False, True]
    out = cp.empty(3, np.float32)
    assert cp.maximum(a, 0, out=out) is out and out.get().tolist() == [1, 0, 3]
    a += 1
    a *= a
    assert a.get().tolist() == [4, 1, 16]
    assert cp.float32 is np.float32 and cp.int64 is np.int64
    assert cp.argmax(a).get() == 2 and a.astype(np.float64).dtype == np.float64
    with pytest.raises(AttributeError):
        a.tobytes()


def test_empty_is_poisoned_and_memory_is_accounted():
    e = cp.empty((2, 2))
    assert np.isnan(e.get()).all()  # a read before a write shows as NaN
    assert (cp.empty(3, np.int64).get() == -1).all()
    pool = cp.get_default_memory_pool()
    gc.collect()
    used = pool.used_bytes()
    big = cp.zeros(1 << 20, np.uint8)
    assert pool.used_bytes() == used + (1 << 20)
    del big
    gc.collect()
    assert pool.used_bytes() == used
    total = cp.cuda.runtime.memGetInfo()[1]
    cp.set_device_memory(used + 1000)
    try:
        with pytest.raises(cp.cuda.memory.OutOfMemoryError):
            cp.empty(2000, np.uint8)
    finally:
        cp.set_device_memory(total)


def test_gpubp_to_numpy_knows_the_emulated_array():
    from gpubp.backends import to_numpy

    assert to_numpy(cp.asarray([1.0, 2.0])).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_base_backend_runs_unchanged_and_never_syncs_for_gradients(dtype):
    class Emulated(Backend):
        name = "emulated"
        xp = cp

    tol = 1e-5 if dtype == np.float32 else 1e-12
    be, ref = Emulated(), Backend()
    for loss, output in (("cross_entropy", "softmax"), ("mse", "tanh")):
        W, b, x, y = random_problem((5, 7, 3), 9, loss, output, np.random.default_rng(0))
        W, b = [w.astype(dtype) for w in W], [v.astype(dtype) for v in b]
        x = x.astype(dtype)
        y = y if y.dtype.kind in "iu" else y.astype(dtype)
        Wd, bd = [cp.asarray(w) for w in W], [cp.asarray(v) for v in b]
        xd, yd = cp.asarray(x), cp.asarray(y)
        cp.reset_stats()
        value, dWs, dbs = be.gradients(Wd, bd, xd, yd, "relu", output, loss)
        assert cp.stats["get"] == 0, "gradients must not read the device"
        v_ref, dW_ref, db_ref = ref.gradients(W, b, x, y, "relu", output, loss)
        assert float(value) == pytest.approx(float(v_ref), rel=tol)
        for got, want in zip([*dWs, *dbs], [*dW_ref, *db_ref]):
            np.testing.assert_allclose(got.get(), want, rtol=tol, atol=tol)
        for make in (lambda: SGD(lr=0.1, momentum=0.9, nesterov=True), lambda: Adam(lr=0.01)):
            o1, o2 = make(), make()
            shapes = [w.shape for w in W] + [v.shape for v in b]
            s1, s2 = o1.bind(None, be, shapes, dtype), o2.bind(None, ref, shapes, dtype)
            W2, b2 = [w.get() for w in Wd], [v.get() for v in bd]
            be.train_step(Wd, bd, xd, yd, "relu", output, loss, o1, s1)
            ref.train_step(W2, b2, x, y, "relu", output, loss, o2, s2)
            for got, want in zip([*Wd, *bd], [*W2, *b2]):
                np.testing.assert_allclose(got.get(), want, rtol=tol, atol=tol)


# --- streams, capture, graphs ---------------------------------------------------------------------


def _handle(stream: cp.Stream, workspace: cp.ndarray | None = None) -> int:
    lib = cp.libcublas()
    h = ctypes.c_void_p()
    assert lib.cublasCreate_v2(ctypes.byref(h)) == 0
    assert lib.cublasSetPointerMode_v2(h.value, 1) == 0
    assert lib.cublasSetStream_v2(h.value, stream.ptr) == 0
    if workspace is not None:
        assert lib.cublasSetWorkspace_v2(h.value, workspace.data.ptr, workspace.nbytes) == 0
    return int(h.value)


def _rowmajor_matmul(h, A, B, C, hp, alpha_slot=0, beta_slot=1):
    """Row-major ``C = A @ B`` as cuBLAS computes it: column-major ``C.T = B.T @ A.T``."""
    (M, K), N = A.shape, B.shape[1]
    dt = C.dtype.type
    item = C.itemsize
    return cp.libcublas().cublasGemmEx(
        h, OP_N, OP_N, N, M, K, hp.data.ptr + alpha_slot * item, B.data.ptr, CODE[dt], N,
        A.data.ptr, CODE[dt], K, hp.data.ptr + beta_slot * item, C.data.ptr, CODE[dt], N,
        COMPUTE[dt], -1,
    )  # fmt: skip


def test_capture_records_launches_gemms_and_copies_and_replays_them(axpb):
    f = axpb.get_function("axpb<float>")
    s = cp.cuda.Stream(non_blocking=True)
    ws = cp.empty(1 << 16, np.uint8)
    h = _handle(s, ws)
    x = cp.zeros(100, np.float32)
    A = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    B = cp.asarray(np.ones((3, 4), np.float32))
    C = cp.zeros((2, 4), np.float32)
    hp = cp.asarray(np.array([1, 0], np.float32))
    pinned = cp.cuda.alloc_pinned_memory(8)
    staged = np.frombuffer(pinned, np.float32, 2)
    staged[:] = [1, 0]
    with s:
        s.begin_capture()
        f((2,), (64,), (x, np.int64(100), np.float32(2), np.float32(1)))
        hp.data.copy_from_host_async(pinned.ptr, 8, s)
        assert _rowmajor_matmul(h, A, B, C, hp) == 0, cp.libcublas().last_error
        graph = s.end_capture()
    assert graph.nodes == [
        "launch axpb<float>",
        "memcpy 8 bytes kind 1",
        "gemm 4x2x3 float32 op=00",
    ]
    assert cp.stats["launch"] == 0 and cp.stats["gemm"] == 0  # recorded, not run
    assert float(x[0]) == 0 and float(C[0, 0]) == 0
    graph.upload(s)
    graph.launch(s)
    assert float(x[0]) == 1
    np.testing.assert_array_equal(C.get(), A.get() @ B.get())
    staged[:] = [2, 0]  # the next replay copies the new alpha and reads it from device memory
    graph.launch(s)
    assert float(x[0]) == 3
    np.testing.assert_array_equal(C.get(), 2 * (A.get() @ B.get()))
    assert graph.launches == 2 and cp.stats["graph_launch"] == 2
    assert cp.launches["axpb<float>"] == 2 and cp.stats["gemm"] == 2


@pytest.mark.parametrize(
    "what",
    ["fill", "elementwise", "setitem", "alloc", "asarray", "get", "float", "sync", "reduce"],
)
def test_anything_else_during_capture_raises_and_invalidates_the_capture(what):
    x = cp.zeros(4)
    s = cp.cuda.Stream(non_blocking=True)
    ops = {
        "fill": lambda: x.fill(1),
        "elementwise": lambda: cp.multiply(x, 2, out=x),
        "setitem": lambda: x.__setitem__(0, 1.0),
        "alloc": lambda: cp.empty(3),
        "asarray": lambda: cp.asarray(np.ones(2)),
        "get": x.get,
        "float": lambda: float(x[0]),
        "sync": s.synchronize,
        "reduce": lambda: cp.sum(x),
    }
    with s:
        s.begin_capture()
        with pytest.raises(cp.StreamCaptureError, match=r"emulated CUDA: .* during stream capture"):
            ops[what]()
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="Invalidated"):
            s.end_capture()
    assert x.get().tolist() == [0, 0, 0, 0]
    assert x[1:].shape == (3,)  # views and metadata are fine again (and during capture)


def test_capture_rules_of_the_c_level_cublas():
    lib = cp.libcublas()
    s = cp.cuda.Stream(non_blocking=True)
    A, B, C = cp.ones((2, 2)), cp.ones((2, 2)), cp.zeros((2, 2))
    hp = cp.asarray(np.array([1.0, 0.0]))
    no_ws = _handle(s)
    other = _handle(cp.cuda.Stream.null, cp.empty(1024, np.uint8))
    with s:
        s.begin_capture()
        assert _rowmajor_matmul(no_ws, A, B, C, hp) == 15  # would allocate its own workspace
        assert "workspace" in lib.last_error
        assert _rowmajor_matmul(other, A, B, C, hp) == 13  # not the capturing stream
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError):
            s.end_capture()


def test_cupy_cublas_wrappers_refuse_capture_as_cupy_does():
    cublas = cp.cuda.cublas
    handle = cp.cuda.device.get_cublas_handle()
    A = cp.asarray(np.arange(4.0).reshape(2, 2))
    C = cp.zeros((2, 2))
    one, zero = ctypes.c_double(1.0), ctypes.c_double(0.0)
    args = (handle, OP_N, OP_N, 2, 2, 2, ctypes.addressof(one), A.data.ptr, 2, A.data.ptr, 2,
            ctypes.addressof(zero), C.data.ptr, 2)  # fmt: skip
    assert cublas.getPointerMode(handle) == 0
    cublas.dgemm(*args)  # outside capture it works (column-major A @ A = (A.T @ A.T).T)
    np.testing.assert_array_equal(C.get(), A.get() @ A.get())
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        msg = "calling cuBLAS API during stream capture is currently unsupported"
        for call in (
            lambda: cublas.getPointerMode(handle),
            lambda: cublas.setPointerMode(handle, 1),
            lambda: cublas.setStream(handle, s.ptr),
            lambda: cublas.dgemm(*args),
        ):
            with pytest.raises(NotImplementedError, match=msg):
                call()
        assert s.end_capture().nodes == []


def test_pageable_host_memory_cannot_be_captured_and_freed_memory_cannot_be_replayed(axpb):
    s = cp.cuda.Stream(non_blocking=True)
    dst = cp.zeros(2)
    host = np.ones(2)
    with s:
        s.begin_capture()
        with pytest.raises(cp.UndefinedBehaviour, match="pinned"):
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, host.ctypes.data, 16, 1, s.ptr)
        s.end_capture()
    x = cp.zeros(64, np.float32)
    f = axpb.get_function("axpb<float>")
    with s:
        s.begin_capture()
        f((1,), (32,), (x, np.int64(64), np.float32(1), np.float32(1)))
        graph = s.end_capture()
    del x
    gc.collect()
    with pytest.raises(cp.UndefinedBehaviour, match="freed"):
        graph.launch(s)


def test_launch_arguments_are_checked(axpb):
    f = axpb.get_function("axpb<double>")
    x = cp.zeros(8)
    with pytest.raises(TypeError):
        f(1, (32,), (x, np.int64(8), 1.0, 0.0))  # grid must be a tuple, as in CuPy
    with pytest.raises(TypeError):
        f((1,), (32,), (np.zeros(8), np.int64(8), np.float64(1), np.float64(0)))  # host memory
    with pytest.raises(cp.CUDADriverError):
        f((1,), (2048,), (x, np.int64(8), np.float64(1), np.float64(0)))
    with pytest.raises(cp.CUDADriverError, match="NOT_FOUND"):
        axpb.get_function("axpb<int>")
    f((1,), (32,), (x, np.int64(8), np.float64(3), np.float64(1)))
    assert x.get().tolist() == [1.0] * 8


# --- the C-level cuBLAS against NumPy -----------------------------------------------------------


def _colmajor(M: np.ndarray, ld: int, fill: float = np.nan) -> np.ndarray:
    """A device buffer holding ``M`` column-major with leading dimension ``ld`` (padding NaN)."""
    rows, cols = M.shape
    buf = np.full((cols, ld), fill, M.dtype)
    buf[:, :rows] = M.T
    return cp.asarray(buf)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ta,tb", list(itertools.product((OP_N, OP_T), repeat=2)))
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_gemmex_equals_numpy(dtype, ta, tb, beta):
    rng = np.random.default_rng(ta * 4 + tb * 2 + int(beta * 2))
    m, n, k = 5, 3, 4
    opA = rng.standard_normal((m, k)).astype(dtype)
    opB = rng.standard_normal((k, n)).astype(dtype)
    C0 = rng.standard_normal((m, n)).astype(dtype)
    A = opA if ta == OP_N else opA.T.copy()
    B = opB if tb == OP_N else opB.T.copy()
    lda, ldb, ldc = A.shape[0] + 2, B.shape[0] + 1, m + 3  # padded leading dimensions
    Ad, Bd = _colmajor(A, lda), _colmajor(B, ldb)
    if beta == 0:
        C0[:] = np.nan  # beta == 0: C is not read, so NaN must not propagate
    Cd = _colmajor(C0, ldc, fill=-7.0)
    hp = cp.asarray(np.array([1.5, beta], dtype))
    s = cp.cuda.Stream(non_blocking=True)
    h = _handle(s)
    status = cp.libcublas().cublasGemmEx(
        h, ta, tb, m, n, k, hp.data.ptr, Ad.data.ptr, CODE[dtype], lda, Bd.data.ptr,
        CODE[dtype], ldb, hp.data.ptr + hp.itemsize, Cd.data.ptr, CODE[dtype], ldc,
        COMPUTE[dtype], -1,
    )  # fmt: skip
    assert status == 0, cp.libcublas().last_error
    want = 1.5 * opA.astype(np.float64) @ opB.astype(np.float64)
    if beta:
        want += beta * C0
    got = Cd.get()
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got[:, :m].T, want, rtol=tol, atol=tol)
    assert (got[:, m:] == -7.0).all()  # the padding beyond m rows is not touched


def test_gemmex_host_pointer_mode_alpha_zero_k_zero_and_tf32():
    lib = cp.libcublas()
    s = cp.cuda.Stream(non_blocking=True)
    h = _handle(s)
    assert lib.cublasSetPointerMode_v2(h, 0) == 0
    A = cp.asarray(np.full((2, 2), np.nan, np.float32))
    C = cp.asarray(np.ones((2, 2), np.float32))
    zero, two = ctypes.c_float(0.0), ctypes.c_float(2.0)
    # alpha == 0: A and B are not read (NaN stays out); C = beta * C
    args = (h, OP_N, OP_N, 2, 2, 2, ctypes.byref(zero), A.data.ptr, R32F, 2, A.data.ptr, R32F, 2,
            ctypes.byref(two), C.data.ptr, R32F, 2, 68, -1)  # fmt: skip
    assert lib.cublasGemmEx(*args) == 0
    assert C.get().tolist() == [[2, 2], [2, 2]]
    # k == 0: C = beta * C (A and B may be null)
    assert lib.cublasGemmEx(h, OP_N, OP_N, 2, 2, 0, ctypes.byref(two), 0, R32F, 2, 0, R32F, 2,
                            ctypes.byref(two), C.data.ptr, R32F, 2, 68, -1) == 0  # fmt: skip
    assert C.get().tolist() == [[4, 4], [4, 4]]
    # TF32 rounds the operands to 10 mantissa bits
    x = np.float32(1 + 2**-12)
    X = cp.asarray(np.array([[x]], np.float32))
    one = ctypes.c_float(1.0)
    for compute, want in ((68, x), (77, np.float32(1))):
        ones = cp.asarray(np.ones((1, 1), np.float32))
        status = lib.cublasGemmEx(h, OP_N, OP_N, 1, 1, 1, ctypes.byref(one), X.data.ptr, R32F, 1,
                                  ones.data.ptr, R32F, 1, ctypes.byref(zero), C.data.ptr, R32F,
                                  1, compute, -1)  # fmt: skip
        assert status == 0
        assert C[0, 0].get() == want


def test_gemmex_bad_arguments_give_a_status_and_bad_memory_raises():
    lib = cp.libcublas()
    s = cp.cuda.Stream(non_blocking=True)
    h = _handle(s)
    A, C = cp.ones((4, 4)), cp.zeros((4, 4))
    hp = cp.asarray(np.array([1.0, 0.0]))
    al, be = hp.data.ptr, hp.data.ptr + 8

    def gemm(**kw):
        a = dict(handle=h, transa=OP_N, transb=OP_N, m=4, n=4, k=4, alpha=al, A=A.data.ptr,
                 Atype=R64F, lda=4, B=A.data.ptr, Btype=R64F, ldb=4, beta=be, C=C.data.ptr,
                 Ctype=R64F, ldc=4, computeType=70, algo=-1)  # fmt: skip
        a.update(kw)
        return lib.cublasGemmEx(*a.values())

    assert gemm() == 0
    assert gemm(handle=12345) == 1
    for bad in ({"lda": 3}, {"ldb": 0}, {"ldc": 2}, {"transa": 5}, {"m": -1}, {"A": 0},
                {"alpha": 0}, {"C": 0}, {"computeType": 3}, {"algo": 50}):  # fmt: skip
        assert gemm(**bad) == 7, (bad, lib.last_error)
    assert gemm(Atype=R32F) == 15  # mixed types
    assert gemm(computeType=68) == 15  # float64 data with a float32 compute type
    assert gemm(m=0) == 0  # nothing to do
    with pytest.raises(cp.UndefinedBehaviour, match="not inside"):
        gemm(lda=5)  # reads past the end of A
    with pytest.raises(cp.UndefinedBehaviour, match="overlaps"):
        gemm(C=A.data.ptr)
    with pytest.raises(cp.UndefinedBehaviour, match="misaligned"):
        gemm(A=A.data.ptr + 4, m=2, n=2, k=2, lda=2, ldb=2, ldc=2)
    assert lib.cublasSetStream_v2(h, 0xDEAD) == 7
    assert lib.cublasSetWorkspace_v2(h, A.data.ptr + 8, 64) == 7  # not 256-byte aligned
    assert lib.cublasDestroy_v2(h) == 0 and lib.cublasDestroy_v2(h) == 1


# --- NCCL over MPI ------------------------------------------------------------------------------


class _FakeComm:
    """One rank of a 2-rank job whose other rank holds the same values (Allreduce doubles)."""

    def __init__(self, rank: int = 0, size: int = 2) -> None:
        self.rank, self.size, self.calls = rank, size, []

    def Split(self, color, key):
        return _FakeComm(key, self.size)

    def Get_size(self):
        return self.size

    def Get_rank(self):
        return self.rank

    def allgather(self, v):
        return [v]

    def Allreduce(self, send, recv, op):
        src = recv.copy() if send is _FAKE_MPI.IN_PLACE else send
        recv[...] = src * 2 if op == "SUM" else src

    def Free(self):
        pass


_FAKE_MPI = types.SimpleNamespace(
    COMM_WORLD=_FakeComm(), IN_PLACE=object(), SUM="SUM", PROD="PROD", MAX="MAX", MIN="MIN",
    Get_processor_name=lambda: "node",
)  # fmt: skip


def test_nccl_allreduce_maps_onto_mpi(monkeypatch):
    monkeypatch.setattr(_nccl, "_mpi", lambda: _FAKE_MPI)  # where NcclCommunicator finds it
    nccl = cp.cuda.nccl
    uid = nccl.get_unique_id()
    assert len(uid) == 128
    comm = nccl.NcclCommunicator(2, uid, 1)
    assert comm.rank_id() == 1 and comm.size() == 2
    buf = cp.asarray(np.arange(6, dtype=np.float32))
    stream = cp.cuda.get_current_stream().ptr
    comm.allReduce(buf[2:].data.ptr, buf[2:].data.ptr, 3, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream)
    assert buf.get().tolist() == [0, 1, 4, 6, 8, 5]  # in place, only the 3 elements asked
    out = cp.zeros(2)
    src = cp.asarray(np.array([1.0, 3.0]))
    nccl.groupStart()
    comm.allReduce(src.data.ptr, out.data.ptr, 2, nccl.NCCL_FLOAT64, nccl.NCCL_AVG, stream)
    assert out.get().tolist() == [0, 0]  # deferred to groupEnd
    nccl.groupEnd()
    assert out.get().tolist() == [1.0, 3.0]
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        comm.allReduce(src.data.ptr, src.data.ptr, 2, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, s.ptr)
        graph = s.end_capture()
    assert graph.nodes == ["nccl allReduce 2 x float64"] and src.get().tolist() == [1, 3]
    graph.launch(s)
    assert src.get().tolist() == [2, 6] and cp.stats["allreduce"] == 3
    with pytest.raises(cp.NcclError):
        nccl.NcclCommunicator(3, uid, 0)  # 2 ranks joined, 3 announced


def test_install_makes_import_cupy_the_emulator():
    import sys

    def ours():
        return {
            n: m for n, m in sys.modules.items() if n.split(".")[0] in ("cupy", "cupy_backends")
        }

    before = ours()
    try:
        cp.install()
        import cupy
        from cupy.cuda import nccl
        from cupy_backends.cuda.libs import cublas

        assert cupy is cp and nccl is cp.cuda.nccl and cublas is cp.cuda.cublas
    finally:
        for name in ours():
            del sys.modules[name]
        sys.modules.update(before)
