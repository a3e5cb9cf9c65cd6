"""The train step's bias gradients of every layer in two launches (gpubp/backends/cuda/bias.py):
the bits of the per-layer kernels, and 2 launches a step where there were 2 L.

The kernels themselves (every launch shape, block order, poisoned columns) are checked in
tests/test_emulated_kernels.py; here the backend's step, on the (emulated) GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp.backends.cuda import catalogue as ck
from gpubp.backends.cuda import launch
from gpubp.backends.cuda.bias import BiasLayers, bias_grad_layers
from gpubp.optim import SGD, Adam

from .conftest import EMULATED_GPU, skip_unless_available
from .test_cupy_backend import _backend, _problem


@pytest.fixture(scope="module")
def cp():
    skip_unless_available("cupy")
    from gpubp.backends.cuda.cupy_module import import_cupy

    return import_cupy()


def _bits(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch", [1, 37, 1000])
def test_one_launch_bias_gradients_are_the_per_layer_kernels_bits(cp, dtype, batch):
    """Layer widths 33, 1 and 257 (a tile and one more, one column, eight tiles and one more):
    the step's db (both kernels once for all layers) equals, bit for bit, the per-layer
    kernels on the same deltas, and the one-off gradient (parameter_gradients, per layer)."""
    be = _backend()
    W, b, x, y = _problem(cp, (7, 33, 1, 257), batch, dtype)
    _, _, dbs = be.gradients(W, b, x, y, "tanh", "softmax", "cross_entropy")
    (step,) = be._steps.values()
    status = be.scratch_status()
    for i, (delta, db) in enumerate(zip(step.deltas, dbs)):
        n = delta.shape[1]
        one = cp.full(n, -7.0, dtype)
        plan = ck.bias_grad_plan(batch, n)
        launch.bias_grad(be.kernel, delta, one, cp.zeros(plan[0] * n), plan, status)
        assert _bits(cp.asnumpy(db), cp.asnumpy(one)), (i, n)
        _, off = be.parameter_gradients(delta, step.a[i])  # the one-off path: its own scratch
        assert _bits(cp.asnumpy(off), cp.asnumpy(one)), (i, n)
        want = cp.asnumpy(delta).astype(np.float64).sum(axis=0)
        np.testing.assert_allclose(cp.asnumpy(db), want, rtol=1e-5 if dtype == "float32" else 1e-12)


def test_the_layer_table_covers_each_layer_once_and_is_checked(cp):
    """Partial sums and tiles follow each other across the layers; a table wider than its
    scratch, or deltas of two dtypes, are refused before any launch."""
    d = [cp.zeros((40, n), np.float32) for n in (1, 33, 5)]
    g = [cp.zeros(n, np.float32) for n in (1, 33, 5)]
    layers = BiasLayers(cp, d, g)
    table = cp.asnumpy(layers.dev)
    assert table[:, ck.BIAS_ITEM0].tolist() == [0, 2, 68] and layers.items == 78
    assert table[:, ck.BIAS_TILE0].tolist() == [0, 1, 3] and layers.tiles == 4
    assert table[:, ck.BIAS_SPLITS].tolist() == [2, 2, 2] and layers.threads == 32
    with pytest.raises(ValueError, match="partial holds 77 values; expected >= 78"):
        bias_grad_layers(lambda name: None, layers, cp.zeros(77), cp.zeros(4, np.int32))
    with pytest.raises(TypeError, match=r"deltas\[1\] is float64; expected float32"):
        BiasLayers(cp, [d[0], cp.zeros((40, 3))], g[:2])
    with pytest.raises(ValueError, match=r"dbs\[0\] has shape \(2,\); expected \(1,\)"):
        BiasLayers(cp, d[:1], [cp.zeros(2, np.float32)])


@pytest.mark.skipif(not EMULATED_GPU, reason="counts the launches of the emulated device")
@pytest.mark.parametrize(
    "make_opt, fold",
    [(lambda: SGD(lr=0.1), False), (lambda: SGD(lr=0.1), True), (lambda: Adam(lr=0.01), False)],
)
def test_a_captured_step_makes_two_bias_launches_for_all_layers(cp, make_opt, fold):
    """3 layers: one partial and one finish launch a step, eager and replayed (there were 2 per
    layer: 6), and no per-layer bias kernel; the gradients-only call too."""
    be = _backend(fold_sgd=fold)
    W, b, x, y = _problem(cp, (9, 33, 1, 5), 11, "float32")
    opt = make_opt()
    state = opt.bind(None, be, [w.shape for w in W] + [v.shape for v in b], "float32")
    cp.reset_stats()
    for _ in range(4):  # eager, then captured and replayed
        be.train_step(W, b, x, y, "relu", "softmax", "cross_entropy", opt, state)
    be.gradients(W, b, x, y, "relu", "softmax", "cross_entropy")  # another step, eager
    be.synchronize()
    assert cp.stats["graph_launch"] == 3
    bias = {k: v for k, v in cp.launches.items() if "bias_grad" in k}
    assert bias == {
        ck.bias_grad_partial_layers("float32"): 5,
        ck.bias_grad_finish_layers("float32"): 5,
    }, bias


@pytest.mark.parametrize("sizes", [(7, 33, 1, 257), (784, 128, 10), (64, 4096, 4096, 3)])
@pytest.mark.parametrize("batch", [1, 37, 1000, 262144])
def test_the_memory_estimate_holds_every_layers_partial_sums(sizes, batch):
    """The step's float64 scratch holds every layer's partial sums one after another (their
    sum, no longer the largest layer's): memory.workspace_bytes counts that much."""
    from gpubp.backends.cuda import memory

    items = sum(ck.bias_grad_plan(batch, n)[0] * n for n in sizes[1:])
    need = 8 * max(ck.LOSS_PARTS, items)
    bound = 8 * sum(sizes[1:]) + batch * (8 * -(-sum(sizes[1:]) // 32) + 8)
    assert need <= bound
    fixed, per_sample = memory.workspace_bytes(sizes, batch, "float32")
    assert fixed + per_sample * batch >= bound
