"""The NumPy backend's steady-state train step allocates no arrays.

Measured with :mod:`tracemalloc` (NumPy reports its array buffers to it) around direct calls of
``backend.train_step`` with arrays already of the model's dtype, after a few warm-up steps have
created the workspace and the optimizer state:

- traced memory does not grow over 100 steps (nothing is kept per step);
- the peak during those steps stays far below one activation buffer ``(B, 128)``;
- the peak does not depend on the batch size, which catches even a ``(B, 1)`` temporary.

NumPy's ufunc machinery itself allocates a fixed iterator buffer (at most 8192 elements) for an
in-place op with a broadcast operand such as ``z += b``; it does not grow with the batch, which
is why the peak bound is checked at a batch where one activation is large next to it.
"""

from __future__ import annotations

import contextlib
import gc
import tracemalloc

import numpy as np
import pytest

import gpubp
from gpubp import optim

SIZES = (64, 128, 128, 10)
WIDE = 128
ITEMSIZE = 4  # float32

OPTIMIZERS = {
    "sgd": lambda: optim.SGD(lr=1e-3),
    "sgd_wd": lambda: optim.SGD(lr=1e-3, weight_decay=1e-4),
    "momentum": lambda: optim.SGD(lr=1e-3, momentum=0.9),
    "nesterov_wd": lambda: optim.SGD(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda: optim.Adam(lr=1e-4),
    "adam_wd": lambda: optim.Adam(lr=1e-4, weight_decay=1e-4),
    "adamw": lambda: optim.AdamW(lr=1e-4),
}

# (activation, output, loss): every activation and every output-delta code path
COMBOS = [
    ("relu", "softmax", "cross_entropy"),
    ("leaky_relu", "sigmoid", "binary_cross_entropy"),
    ("tanh", "softmax", "mse"),
    ("sigmoid", "tanh", "mse"),
    ("identity", "identity", "mse"),
    ("relu", "relu", "mse"),
    ("relu", "sigmoid", "mse"),
]


REFILL_STEPS = 100


def make_step(opt_name: str, batch: int, combo=COMBOS[0], labels: bool = True):
    """A no-argument callable doing one ``backend.train_step`` on pre-converted float32 arrays."""
    activation, output, loss = combo
    be = gpubp.get_backend("numpy")
    model = gpubp.MLP(SIZES, activation, output, loss, backend="numpy", dtype="float32", seed=0)
    W, b = model.get_parameters()
    W = [be.asarray(w, np.float32) for w in W]
    b = [be.asarray(v, np.float32) for v in b]
    rng = np.random.default_rng(0)
    x = be.asarray(rng.standard_normal((batch, SIZES[0])), np.float32)
    n_out = SIZES[-1]
    if loss == "binary_cross_entropy":
        y = be.asarray(rng.random((batch, n_out)) > 0.5, np.float32)
    elif labels and loss in ("cross_entropy", "mse"):
        y = be.asarray(rng.integers(0, n_out, batch), np.int64)
    else:
        y = be.asarray(rng.standard_normal((batch, n_out)), np.float32)
    opt = OPTIMIZERS[opt_name]()
    shapes = [tuple(a.shape) for a in W + b]
    state = opt.bind(None, be, shapes, np.float32)

    def step():
        return be.train_step(W, b, x, y, activation, output, loss, opt, state)

    return step


@contextlib.contextmanager
def tracing():
    """tracemalloc on for the block (left as it was if the run already traces)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        yield
    finally:
        if started:
            tracemalloc.stop()


def measure(step, n: int, warmup: int = 5, growth: bool = True):
    """``(growth, peak, sites)`` over ``n`` steps after ``warmup`` untraced ones.

    ``growth``: bytes still held after ``n`` steps (after a full garbage collection, which also
    empties CPython's free lists); skipped (``None``) with ``growth=False``. ``peak``: the most
    bytes held at any moment during ``n`` further steps, above what was held before them,
    measured after ``REFILL_STEPS`` more steps have refilled the free lists (CPython keeps up
    to 80 freed dicts; NumPy's keepdims reductions return about one there per step), so that
    refilling is not counted. ``sites``: the top allocation sites still held after the first
    ``n`` steps, for the failure message.
    """
    for _ in range(warmup):
        step()
    grown, sites = None, ""
    with tracing():
        if growth:
            gc.collect()
            before = tracemalloc.take_snapshot()
            gc.collect()
            start, _ = tracemalloc.get_traced_memory()
            for _ in range(n):
                step()
            gc.collect()
            end, _ = tracemalloc.get_traced_memory()
            after = tracemalloc.take_snapshot()
            grown = end - start
            sites = "\n".join(str(s) for s in after.compare_to(before, "lineno")[:5])
            del before, after
        for _ in range(REFILL_STEPS):
            step()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(n):
            step()
        _, peak = tracemalloc.get_traced_memory()
    return grown, peak - base, sites


def activation_bytes(batch: int) -> int:
    return batch * WIDE * ITEMSIZE


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_steady_state_does_not_grow(opt_name):
    growth, _, sites = measure(make_step(opt_name, 256), 100)
    # one leaked Python float (32 traced bytes) per step would already be 3 KiB
    assert growth < 2 * 1024, f"traced memory grew by {growth} bytes over 100 steps:\n{sites}"


@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
def test_steady_state_does_not_grow_any_combination(combo):
    growth, _, sites = measure(make_step("momentum", 256, combo), 100)
    assert growth < 2 * 1024, f"traced memory grew by {growth} bytes over 100 steps:\n{sites}"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_peak_far_below_one_activation_buffer(opt_name):
    batch = 1024
    # every step is the same: an array-sized temporary shows in the peak of any of them (20,
    # as in the batch test below; 100 traced steps took 14-17 s)
    _, peak, _ = measure(make_step(opt_name, batch), 20, growth=False)
    limit = activation_bytes(batch) // 10
    assert peak < limit, (
        f"peak traced memory {peak} bytes during 20 steps; one (B, {WIDE}) activation is "
        f"{activation_bytes(batch)} bytes, so some op allocates an array-sized temporary"
    )


# 768 more rows: even one (B, 1) float32 temporary would add 3 KiB to the peak
BATCHES = (256, 1024)
SCALING_SLACK = 2 * 1024


def _scaling_failure(peaks) -> str:
    return (
        f"peak traced memory grows with the batch size: {peaks}; some op allocates a "
        "temporary proportional to the batch"
    )


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_peak_does_not_grow_with_batch(opt_name):
    peaks = {batch: measure(make_step(opt_name, batch), 20, growth=False)[1] for batch in BATCHES}
    assert peaks[BATCHES[1]] - peaks[BATCHES[0]] < SCALING_SLACK, _scaling_failure(peaks)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "dense-targets"])
@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
def test_peak_does_not_grow_with_batch_any_combination(combo, labels):
    peaks = {
        batch: measure(make_step("adam", batch, combo, labels), 20, growth=False)[1]
        for batch in BATCHES
    }
    assert peaks[BATCHES[1]] - peaks[BATCHES[0]] < SCALING_SLACK, _scaling_failure(peaks)


def test_measurement_can_see_an_allocation():
    """The harness is not blind: a step that allocates one activation is caught."""
    inner = make_step("sgd", 256)

    def allocating_step():
        inner()
        return np.zeros((256, WIDE), dtype=np.float32) + 1.0

    growth, peak, _ = measure(allocating_step, 10)
    assert peak >= activation_bytes(256)
    assert growth < activation_bytes(256)  # freed again: peak, not growth
