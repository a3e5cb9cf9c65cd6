"""Dry run of the cupy backend's host logic on a NumPy fake of CuPy, without a GPU.

Run by tests/test_cupy_host.py in a subprocess (it installs a fake ``cupy`` module). Every kernel
launch is checked against the kernel's C++ signature (argument count, scalar widths, pointer
element types), every GEMM's shapes against its operands, and the train step must be captured
and replayed as a graph from its second run.
"""

import itertools
import re
import sys
import types

import numpy as np

sys.path.insert(0, sys.argv[1])


class FA(np.ndarray):
    @property
    def data(self):
        return types.SimpleNamespace(
            ptr=self.__array_interface__["data"][0], copy_from_host_async=lambda *a: None
        )

    def get(self):
        return np.asarray(self)


def wrap(f):
    return lambda *a, **k: np.asarray(f(*a, **k)).view(FA)


calls = []


class Stream:
    def __init__(self, **k):
        self.ptr = 0

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass

    def wait_event(self, e):
        pass

    def record(self):
        return Event()

    def begin_capture(self):
        calls.append(("begin_capture",))

    def end_capture(self):
        class G:
            def upload(self, s):
                pass

            def launch(self, stream=None):
                calls.append(("graph_launch",))

        return G()

    def synchronize(self):
        pass


class Event:
    def __init__(self, **k):
        pass

    def record(self, s=None):
        pass

    def synchronize(self):
        pass


cuda = types.SimpleNamespace(
    Device=lambda: types.SimpleNamespace(id=0),
    get_current_stream=lambda: Stream(),
    Stream=Stream,
    Event=Event,
    alloc_pinned_memory=lambda n: types.SimpleNamespace(ptr=0, __buffer__=None),
    runtime=types.SimpleNamespace(
        memcpyAsync=lambda *a: None, memGetInfo=lambda: (1 << 30, 1 << 31)
    ),
    memory=types.SimpleNamespace(OutOfMemoryError=MemoryError),
)


class Pinned(bytearray):
    ptr = 0


cuda.alloc_pinned_memory = lambda n: Pinned(n)
cp = types.SimpleNamespace(
    ndarray=FA,
    cuda=cuda,
    asarray=wrap(np.asarray),
    zeros=wrap(np.zeros),
    empty=wrap(np.empty),
    arange=wrap(np.arange),
    empty_like=wrap(np.empty_like),
    ascontiguousarray=wrap(np.ascontiguousarray),
    get_default_memory_pool=None,
)
sys.modules["cupy"] = cp

from gpubp.backends import cuda_kernels as ck  # noqa: E402 - after the fake cupy
from gpubp.backends import cupy_backend as cb  # noqa: E402 - after the fake cupy
from gpubp.optim import SGD, Adam  # noqa: E402 - after the fake cupy


def gemm(self, ta, tb, A, B, C, alpha, beta, hp):
    M = A.shape[1] if ta else A.shape[0]
    K = A.shape[0] if ta else A.shape[1]
    Kb = B.shape[1] if tb else B.shape[0]
    N = B.shape[0] if tb else B.shape[1]
    assert K == Kb and C.shape == (M, N), (A.shape, B.shape, C.shape, ta, tb)
    assert alpha in ck.HP and beta in ck.HP and hp.size == ck.HP_SLOTS
    calls.append(("gemm", alpha, beta, C.shape))


SIGS = {}
for fam in ck.FAMILIES:
    for m in re.finditer(r"__global__\s+void\s+(\w+)\s*\((.*?)\)\s*\{", ck.source(fam), re.S):
        SIGS[m[1]] = [p.strip() for p in m[2].split(",")]


def launch(self, name, blocks, args):
    ck.family_of(name)
    assert blocks >= 1
    base = re.match(r"gpubp::(\w+)", name)[1]
    T = {"float": np.float32, "double": np.float64}.get((re.findall(r"<(\w+)", name) or [""])[0])
    params = SIGS[base]
    assert len(params) == len(args), (name, params, args)
    for p, a in zip(params, args):
        if "*" in p:
            assert isinstance(a, FA) or type(a) is np.uint64, (name, p, type(a))
            elem = p.split("*")[0].replace("const", "").strip()
            want = {
                "T": T,
                "i64": np.int64,
                "int": np.int32,
                "double": np.float64,
                "unsigned long long": np.uint64,
            }[elem]
            if isinstance(a, FA):
                assert a.dtype == want and a.flags.c_contiguous, (name, p, a.dtype)
        elif p.startswith("i64"):
            assert type(a) is np.int64, (name, p, type(a))
        elif p.startswith("int"):
            assert type(a) is np.int32, (name, p, type(a))
        elif p.startswith("double"):
            assert type(a) is np.float64, (name, p, type(a))
        elif p.startswith("T "):
            assert type(a) is T, (name, p, type(a))
        else:
            raise AssertionError((name, p))
    calls.append((name, blocks))


cb.CupyBackend._gemm = gemm
cb.CupyBackend._launch = launch

for fold in (False, True):
    be = cb.CupyBackend(fold_sgd=fold)
    sizes = (5, 33, 7, 3)
    W = [cp.asarray(np.ones((b, a), np.float32)) for a, b in itertools.pairwise(sizes)]
    b = [cp.zeros(n, np.float32) for n in sizes[1:]]
    x = cp.asarray(np.ones((9, 5), np.float32))
    y = cp.asarray(np.arange(9) % 3)
    for opt in (
        SGD(lr=0.1),
        SGD(lr=0.1, momentum=0.9, nesterov=True),
        Adam(lr=0.01, decoupled=True),
    ):
        state = opt.bind(object(), be, [w.shape for w in W] + [v.shape for v in b], np.float32)
        for _ in range(3):
            calls.clear()
            v, *_ = be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
        assert ("graph_launch",) in calls, calls
        print(fold, opt.kind, state["step"], len(be._steps))
    be.gradients(W, b, x, y, "tanh", "sigmoid", "binary_cross_entropy")
    be.gradients(W, b, x, cp.asarray(np.ones((9, 3), np.float32)), "tanh", "softmax", "mse")
    be.forward(W, b, x, "relu", "softmax")
    be.parameter_gradients(
        cp.asarray(np.ones((9, 3), np.float32)), cp.asarray(np.ones((9, 7), np.float32))
    )
    be.output_delta(cp.asarray(np.ones((9, 3), np.float32)), y, "softmax", "cross_entropy")
    be.hidden_delta(
        cp.asarray(np.ones((9, 3), np.float32)),
        W[2],
        cp.asarray(np.ones((9, 7), np.float32)),
        "relu",
    )
    st = {
        "step": 0,
        "exp_avg": [cp.zeros(w.shape, np.float32) for w in W],
        "exp_avg_sq": [cp.zeros(w.shape, np.float32) for w in W],
    }
    be.update_parameters(W, W, Adam(), st)
    be.argmax_correct(cp.asarray(np.ones((9, 3), np.float32)), y)
    be.threshold_correct(
        cp.asarray(np.ones((9, 3), np.float32)), cp.asarray(np.ones((9, 3), np.float32))
    )
print("smoke ok")
