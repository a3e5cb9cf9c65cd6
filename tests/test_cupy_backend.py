"""CuPy-specific behaviour on a GPU: graph replay equals eager launches, the deferred non-finite
error, the out-of-memory message, the TF32 switch, alignment and launch-shape independence, and
the evaluation kernels. (The backend-vs-reference matrix runs for cupy through ``backend_name``
in tests/test_backends.py.) Without a GPU all of it runs on the emulated device (the kernels
compiled for the CPU, CuPy emulated over NumPy, see tests/conftest.py), where a few tests also
count what the device was asked to do: graph replays, eager launches, host reads.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp import reference as ref
from gpubp.backends.cuda import catalogue as ck
from gpubp.check import random_problem
from gpubp.errors import DeviceOutOfMemoryError, NonFiniteLossError
from gpubp.optim import SGD, Adam, AdamW
from gpubp.schedules import Schedule

from .conftest import EMULATED_GPU, SCHEDULE_PLAN, set_scheduled_rate, skip_unless_available


@pytest.fixture(scope="module")
def cp():
    skip_unless_available("cupy")
    from gpubp.backends.cuda.cupy_module import import_cupy

    return import_cupy()


def _backend(**kwargs):
    from gpubp.backends.cuda import CupyBackend

    return CupyBackend(**kwargs)


def _problem(cp, sizes, batch, dtype, loss="cross_entropy", output="softmax", seed=0):
    W, b, x, y = random_problem(sizes, batch, loss, output, np.random.default_rng(seed))
    Wd = [cp.asarray(w, dtype) for w in W]
    bd = [cp.asarray(v, dtype) for v in b]
    yd = cp.asarray(y) if y.dtype.kind in "iu" else cp.asarray(y, dtype)
    return Wd, bd, cp.asarray(x, dtype), yd


@pytest.mark.parametrize(
    "make_opt", [lambda: SGD(lr=0.1), lambda: SGD(lr=0.05, momentum=0.9), lambda: Adam(lr=0.01)]
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("fold", [False, True])
def test_graph_replay_equals_eager(cp, make_opt, dtype, fold):
    results = []
    for graphs in (True, False):
        be = _backend(graphs=graphs, fold_sgd=fold)
        W, b, x, y = _problem(cp, (33, 65, 10), 37, dtype)
        opt = make_opt()
        state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], dtype)
        losses = []
        for k in range(5):
            lr = 0.1 / (k + 1)  # a schedule: the graph must read the new rate
            opt.lr = lr
            value, *_ = be.train_step(W, b, x, y, "tanh", "softmax", "cross_entropy", opt, state)
            losses.append(float(value))
        assert state["step"] == 5
        results.append(([cp.asnumpy(p) for p in [*W, *b]], losses))
        if graphs:
            assert any(s.graph not in (None, False) for s in be._steps.values())
    (p1, l1), (p2, l2) = results
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, c in zip(p1, p2):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make_opt", [lambda: SGD(lr=0.1), lambda: Adam(lr=0.01)])
@pytest.mark.parametrize("fold", [False, True])
def test_graph_train_steps_match_the_reference(cp, make_opt, fold):
    be = _backend(fold_sgd=fold)
    sizes, B = (20, 33, 3), 9
    W, b, x, y = _problem(cp, sizes, B, "float64", loss="mse", output="identity")
    opt = make_opt()
    shapes = [w.shape for w in W] + [v.shape for v in b]
    state = opt.bind(None, be, shapes, "float64")
    params = [cp.asnumpy(p) for p in [*W, *b]]
    rstate = {"step": 0, **{s: [np.zeros(sh) for sh in shapes] for s in opt.slots}}
    xr, yr = cp.asnumpy(x), cp.asnumpy(y)
    for _ in range(4):
        value, *_ = be.train_step(W, b, x, y, "relu", "identity", "mse", opt, state)
        rvalue, params_w, params_b, rstate = ref.train_step(
            params[:2], params[2:], xr, yr, "relu", "identity", "mse", opt, rstate
        )
        np.testing.assert_allclose(float(value), rvalue, rtol=1e-10)
        params = [*params_w, *params_b]
    for p, r in zip([*W, *b], params):
        np.testing.assert_allclose(cp.asnumpy(p), r, rtol=1e-9, atol=1e-12)


def test_non_finite_step_raises_at_the_next_sync_with_the_last_good_parameters(cp):
    be = _backend()
    W, b, x, y = _problem(cp, (8, 16, 4), 5, "float32")
    opt = Adam(lr=0.01)
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
    be.synchronize()
    good = [cp.asnumpy(p) for p in [*W, *b, *state["exp_avg"], *state["exp_avg_sq"]]]
    bad_x = x.copy()
    bad_x[2, 3] = np.nan
    # queued without a host sync: no error yet
    value, *_ = be.train_step(W, b, bad_x, y, "relu", "softmax", "cross_entropy", opt, state)
    be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)  # also skipped
    with pytest.raises(NonFiniteLossError, match="last good step"):
        be.synchronize()
    assert state["step"] == 1
    now = [cp.asnumpy(p) for p in [*W, *b, *state["exp_avg"], *state["exp_avg_sq"]]]
    for g, n in zip(good, now):
        np.testing.assert_array_equal(g, n)
    be.synchronize()  # reported once; training goes on
    value, *_ = be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
    assert np.isfinite(float(value)) and state["step"] == 2


def test_non_finite_folded_sgd_keeps_the_weights(cp):
    be = _backend(fold_sgd=True)
    W, b, x, y = _problem(cp, (8, 16, 4), 5, "float32")
    opt = SGD(lr=0.1)  # plain SGD: the update is folded into the gradient GEMM
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    before = [cp.asnumpy(p) for p in [*W, *b]]
    bad = x.copy()
    bad[1, 2] = np.inf  # inf * w in the first GEMM: infinite and NaN activations
    value, *_ = be.train_step(W, b, bad, y, "identity", "softmax", "cross_entropy", opt, state)
    with pytest.raises(NonFiniteLossError):
        float(value)
    for p, q in zip(before, [*W, *b]):
        np.testing.assert_array_equal(p, cp.asnumpy(q))


def test_model_train_step_raises_at_once(cp):
    model = gpubp.MLP([4, 8, 3], backend="cupy", dtype="float32")
    # finite parameters and inputs whose products overflow float32 in the first GEMM
    model.set_parameters([np.full((8, 4), 1e30), np.full((3, 8), 1e30)], [np.zeros(8), np.zeros(3)])
    before = model.get_parameters()
    x = np.full((6, 4), 1e30, dtype=np.float32)
    with pytest.raises(NonFiniteLossError):
        model.train_step(x, np.arange(6) % 3, SGD(lr=1.0, momentum=0.9))
    after = model.get_parameters()
    for p, q in zip(before[0] + before[1], after[0] + after[1]):
        np.testing.assert_array_equal(p, q)


@pytest.fixture
def small_device(cp):
    """On the emulated GPU, a 512 MiB device for the test (allocating half of the default
    16 GiB in host memory took 44 s); a real GPU is left as it is."""
    shrink = getattr(cp, "set_device_memory", None)
    if shrink is None:
        yield
        return
    from cudaemu import _memory

    before = _memory._mem.limit
    shrink(512 << 20)
    try:
        yield
    finally:
        shrink(before)


def test_out_of_memory_error_gives_bytes_and_a_batch_that_fits(cp, small_device):
    be = _backend()
    free = cp.cuda.runtime.memGetInfo()[0]
    sizes = (4096, 4096, 10)
    batch = int(2 * free // (4 * 4096 * 2)) + 1  # activations alone need twice what is free
    with pytest.raises(DeviceOutOfMemoryError) as info:
        be._allocate(sizes, batch, np.dtype("float32"))
    msg = str(info.value)
    assert "bytes" in msg and f"batch size {batch}" in msg
    fits = int(msg.split("batch_size=")[1].split()[0])
    assert 0 < fits < batch
    be._allocate(sizes, fits, np.dtype("float32"))  # the advice is right


def test_the_cupy_module_can_be_given_to_the_backend(cp, monkeypatch):
    """``CupyBackend(cupy=module)`` uses that module, whatever GPUBP_CUPY_MODULE names."""
    monkeypatch.setenv("GPUBP_CUPY_MODULE", "no_such_module_for_gpubp")
    be = _backend(cupy=cp)
    assert be.xp is cp
    z = be.forward_layer(cp.ones((3, 2)), cp.ones((4, 2)), cp.zeros(4), "identity")
    np.testing.assert_array_equal(cp.asnumpy(z), np.full((3, 4), 2.0))


def test_a_stand_in_module_is_named_and_auto_never_takes_it(monkeypatch):
    """GPUBP_CUPY_MODULE naming a module that cannot be imported: the cupy backend cannot run,
    and the reason names the variable; a stand-in that can run is never what auto picks."""
    monkeypatch.setenv("GPUBP_CUPY_MODULE", "no_such_module_for_gpubp")
    why = gpubp.backend_status()["cupy"]
    assert why is not None and "GPUBP_CUPY_MODULE=no_such_module_for_gpubp" in why
    assert "cannot be imported" in why
    if EMULATED_GPU:
        monkeypatch.setenv("GPUBP_CUPY_MODULE", "cudaemu.cupy")
        assert gpubp.backend_status()["cupy"] is None
        assert gpubp.get_backend("auto").name != "cupy"


def test_tf32_is_off_unless_asked(cp):
    rng = np.random.default_rng(0)
    a, W = rng.normal(size=(256, 1024)), rng.normal(size=(512, 1024))
    b = np.zeros(512)
    exact = a @ W.T
    outs = {}
    for tf32 in (False, True):
        be = _backend(tf32=tf32)
        z = be.forward_layer(cp.asarray(a, "float32"), cp.asarray(W, "float32"),
                             cp.asarray(b, "float32"), "identity")  # fmt: skip
        outs[tf32] = cp.asnumpy(z).astype(np.float64)
    scale = np.abs(exact).max()
    assert np.abs(outs[False] - exact).max() / scale < 1e-5  # true float32
    if int(cp.cuda.Device().compute_capability) >= 80:
        assert np.abs(outs[True] - exact).max() / scale > 1e-5  # tensor cores, ~10-bit mantissa


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
def test_kernels_ignore_alignment_and_launch_shape(cp, activation):
    be = _backend()
    rng = np.random.default_rng(1)
    rows, n = 13, 7  # n not a multiple of 4: the scalar path; offset 1: unaligned pointers
    z0, bias = rng.normal(size=(rows, n)), rng.normal(size=n)
    expected = ref.activate(z0 + bias, activation)
    for offset, blocks, threads in ((0, 1, 32), (1, 3, 64), (1, 1000, 256)):
        flat = cp.zeros(rows * n + offset, dtype="float32")
        z = flat[offset:].reshape(rows, n)
        z[...] = cp.asarray(z0, "float32")
        bd = cp.asarray(bias, "float32")
        kernel = be.kernel(ck.bias_activation("float32", activation))
        kernel((blocks,), (threads,), (z, bd, np.int64(rows), np.int32(n), be.scratch_status()))
        np.testing.assert_allclose(cp.asnumpy(z), expected, rtol=1e-5, atol=1e-6)


def test_argmax_and_accuracy_kernels_follow_numpy(cp):
    be = _backend()
    rng = np.random.default_rng(2)
    a = rng.integers(0, 3, size=(70, 45)).astype(np.float32)  # many ties
    a[5, 7] = np.nan
    labels = rng.integers(0, 45, 70)
    pred, correct = be.argmax_correct(cp.asarray(a), cp.asarray(labels))
    np.testing.assert_array_equal(cp.asnumpy(pred), np.argmax(a, axis=1))
    assert int(correct) == int((np.argmax(a, axis=1) == labels).sum())
    onehot = np.eye(45, dtype=np.float32)[labels]
    _, correct_dense = be.argmax_correct(cp.asarray(a), cp.asarray(onehot))
    assert int(correct_dense) == int(correct)
    s, t = rng.random((9, 3)), (rng.random((9, 3)) < 0.5).astype(np.float64)
    assert int(be.threshold_correct(cp.asarray(s), cp.asarray(t))) == int(((s > 0.5) == t).sum())


# --- the emulated device can see what a GPU run hides: graphs, syncs, the guard ---------------

emulated_only = pytest.mark.skipif(
    not EMULATED_GPU, reason="counts launches and transfers of the emulated device"
)


@emulated_only
@pytest.mark.parametrize("fold", [False, True])
def test_train_step_is_captured_as_a_graph_and_replayed(cp, fold):
    """From its second run a step is one graph launch (no eager fallback, no warning): the
    kernels and our own cuBLAS handle's GEMMs are recorded, nothing runs at capture."""
    import warnings

    be = _backend(fold_sgd=fold)
    W, b, x, y = _problem(cp, (9, 33, 5), 11, "float32")
    opt = SGD(lr=0.05)
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager fallback warns: that would fail here
        be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
        cp.reset_stats()
        for _ in range(3):
            be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
        be.synchronize()
    (step,) = be._steps.values()
    assert step.graph not in (None, False)
    assert cp.stats["graph_launch"] == 3  # steps 2, 3 and 4 are replays
    assert cp.stats["eager_launch"] == 0 and cp.stats["eager_gemm"] == 0  # nothing eager...
    # ...and the capture held every GEMM of the two layers: 2 forward, 1 backward, 2 gradient
    assert cp.stats["captured_gemm"] == 5
    # CuPy's own cuBLAS wrappers refuse a capturing stream: the old route could never capture
    s = cp.cuda.Stream(non_blocking=True)
    handle = cp.cuda.device.get_cublas_handle()  # made before: creating one is refused too
    with s:
        s.begin_capture()
        try:
            with pytest.raises(NotImplementedError, match="during stream capture"):
                cp.cuda.cublas.setStream(handle, s.ptr)
        finally:
            s.end_capture()  # CuPy refuses before calling cuBLAS: the capture itself is intact


@emulated_only
def test_fit_reads_the_loss_once_per_epoch_not_per_step(cp):
    """MLP.fit queues every step of an epoch without a device-to-host read in between."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 6)).astype(np.float32)
    y = rng.integers(0, 3, 256)
    model = gpubp.MLP([6, 16, 3], backend="cupy", dtype="float32", seed=0)
    opt = Adam(lr=1e-3)
    model.fit(X, y, epochs=1, batch_size=32, optimizer=opt, progress=False)  # compiles, captures
    cp.reset_stats()
    model.fit(X, y, epochs=2, batch_size=32, optimizer=opt, progress=False)  # 16 steps
    # checking X and y once per fit, then per epoch one read of the status word and one of all
    # the epoch's losses: a handful, where one per step would be 16 or more
    assert cp.stats["graph_launch"] == 16
    assert cp.stats["get"] <= 10, cp.stats


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("fold", [False, True])
def test_nan_input_under_relu_raises_and_keeps_the_parameters(cp, fold, graph):
    """ReLU maps a NaN pre-activation to 0, so the forward flags never saw it; the folded GEMM
    W -= lr * delta.T @ x would then write NaN into W[0]. Eagerly (the first step of a shape)
    and as a replayed graph (after two good steps)."""
    be = _backend(fold_sgd=fold)
    W, b, x, y = _problem(cp, (8, 16, 4), 5, "float32")
    opt = SGD(lr=0.1)
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    for _ in range(2 if graph else 0):
        be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
    before = [cp.asnumpy(p) for p in [*W, *b]]
    steps = state["step"]
    bad = x.copy()
    bad[2, 3] = np.nan
    value, *_ = be.train_step(W, b, bad, y, "relu", "softmax", "cross_entropy", opt, state)
    with pytest.raises(NonFiniteLossError):
        float(value)
    for p, q in zip(before, [*W, *b]):
        np.testing.assert_array_equal(p, cp.asnumpy(q))
    assert state["step"] == steps
    (step,) = be._steps.values()
    assert (step.graph not in (None, False)) == graph


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("fold", [False, True])
def test_bias_gradient_overflow_raises_and_keeps_the_parameters(cp, fold, graph):
    """Every hidden delta finite (2e38) but their float32 batch sum is not (8e38): the bias
    gradient overflows inside the column-sum kernel and must be flagged there."""
    be = _backend(fold_sgd=fold)
    B = 4
    W = [cp.zeros((3, 2), np.float32), cp.full((2, 3), 1e30, np.float32)]
    b = [cp.zeros(3, np.float32), cp.zeros(2, np.float32)]
    x = cp.zeros((B, 2), np.float32)  # dW = delta.T @ x stays 0
    y = cp.full((B, 2), -1e8 * B, np.float32)  # output delta (a - y) / B = 1e8
    opt = SGD(lr=0.1)
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    if graph:  # two good steps (tiny targets) capture the step; the bad one is a replay
        for _ in range(2):
            be.train_step(W, b, x, cp.zeros((B, 2), np.float32), "identity", "identity", "mse",
                          opt, state)  # fmt: skip
    before = [cp.asnumpy(p) for p in [*W, *b]]
    value, *_ = be.train_step(W, b, x, y, "identity", "identity", "mse", opt, state)
    with pytest.raises(NonFiniteLossError):
        float(value)
    for p, q in zip(before, [*W, *b]):
        np.testing.assert_array_equal(p, cp.asnumpy(q))
    (step,) = be._steps.values()
    assert (step.graph not in (None, False)) == graph


@pytest.mark.parametrize("graphs", [True, False])
def test_adams_step_count_on_the_device_follows_the_optimizers(cp, graphs):
    """Adam's bias corrections come from a step counter on the device (no upload per step):
    it follows the optimizer's count through skipped steps (not counted), a count set from
    outside (a loaded checkpoint) and a second batch shape (its own step), as the reference."""
    be = _backend(graphs=graphs)
    sizes = (12, 17, 3)
    W, b, x, y = _problem(cp, sizes, 9, "float64")
    x2, y2 = x[:5].copy(), y[:5].copy()  # another batch shape: another train step
    bad_x = x.copy()
    bad_x[0, 0] = np.nan
    opt = Adam(lr=0.01)
    shapes = [w.shape for w in W] + [v.shape for v in b]
    state = opt.bind(None, be, shapes, "float64")
    params = [cp.asnumpy(p) for p in [*W, *b]]
    rstate = {"step": 0, **{s: [np.zeros(sh) for sh in shapes] for s in opt.slots}}

    def both(xd, yd):
        nonlocal params, rstate
        value, *_ = be.train_step(W, b, xd, yd, "tanh", "softmax", "cross_entropy", opt, state)
        rvalue, rw, rb, rstate = ref.train_step(
            params[:2], params[2:], cp.asnumpy(xd), cp.asnumpy(yd), "tanh", "softmax",
            "cross_entropy", opt, rstate,
        )  # fmt: skip
        np.testing.assert_allclose(float(value), rvalue, rtol=1e-10)
        params = [*rw, *rb]

    for _ in range(3):
        both(x, y)
    be.train_step(W, b, bad_x, y, "tanh", "softmax", "cross_entropy", opt, state)
    with pytest.raises(NonFiniteLossError):
        be.synchronize()
    assert state["step"] == 3
    both(x, y)
    both(x2, y2)
    both(x, y)
    state["step"] = rstate["step"] = 1000  # as a loaded checkpoint sets it
    both(x, y)
    both(x, y)
    assert state["step"] == 1002
    for p, r in zip([*W, *b], params):
        np.testing.assert_allclose(cp.asnumpy(p), r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize(
    "make_opt, dtype",
    [
        (lambda: SGD(lr=1.0, momentum=0.9, weight_decay=0.01), "float32"),
        (lambda: AdamW(lr=1.0, weight_decay=0.1), "float64"),
    ],
)
def test_a_schedule_computed_on_the_device_gives_the_hosts_steps(cp, graphs, make_opt, dtype):
    """An optimizer that follows a cosine schedule (Optimizer.follow) has its rate computed in
    the step from a global step counter on the device: the same bits as the steps with the
    rate set by the host, through a second batch shape, a rate set by hand, a jump of the
    global step (a resumed run), the last step and beyond; the counter is the device's."""
    sched = Schedule("cosine", 0.05, 8)
    sizes = (12, 17, 3)
    plan = SCHEDULE_PLAN
    runs, counts = [], []
    for follow in (True, False):
        be = _backend(graphs=graphs)
        W, b, x, y = _problem(cp, sizes, 9, dtype)
        opt = make_opt()
        state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], dtype)
        for t, short in plan:
            set_scheduled_rate(opt, sched, t, follow)
            xd, yd = (x[:5].copy(), y[:5].copy()) if short else (x, y)
            be.train_step(W, b, xd, yd, "tanh", "softmax", "cross_entropy", opt, state)
        runs.append([cp.asnumpy(p) for p in [*W, *b]])
        counts.append([int(s.scalars.count[0]) for s in be._steps.values() if s.device_lr])
    for p, q in zip(*runs):
        np.testing.assert_array_equal(p, q)
    assert sorted(counts[0]) == [3, 31] and counts[1] == [], counts
