"""The new parameters and optimizer state are part of a step's finite check, on every backend.

A step whose update would make any parameter or state value NaN or infinite raises
NonFiniteLossError and changes nothing: not the parameters updated before the offending one,
not the momentum or Adam state, not the step count. The loss and every gradient are finite in
these cases; only the update overflows (a learning rate beyond the dtype, or a large finite one
on large gradients). Also: the Numba backend's update split over threads checks every part
before any part writes, and matches the reference on awkward sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp import optim
from gpubp import reference as ref
from gpubp.backends import to_numpy
from gpubp.check import TOLERANCE, rel_error

SIZES = (13, 33, 7, 5)  # widths that are not multiples of 32
OPTIMIZERS = {
    "sgd": lambda lr: optim.SGD(lr=lr),
    "sgd_wd": lambda lr: optim.SGD(lr=lr, weight_decay=1e-3),
    "momentum": lambda lr: optim.SGD(lr=lr, momentum=0.9),
    "nesterov": lambda lr: optim.SGD(lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda lr: optim.Adam(lr=lr),
    "adamw": lambda lr: optim.AdamW(lr=lr, weight_decay=1e-3),
}


def fresh(backend_name: str) -> gpubp.backends.Backend:
    """A new instance of the backend: its own workspaces, staging arrays and CUDA graphs."""
    return type(gpubp.get_backend(backend_name))()


def problem(rng: np.random.Generator, batch: int = 9):
    W = [(rng.standard_normal((SIZES[i + 1], SIZES[i])) / 3).astype(np.float32) for i in range(3)]
    b = [rng.standard_normal(SIZES[i + 1]).astype(np.float32) for i in range(3)]
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], batch).astype(np.int64)
    return W, b, x, y


def host(arrays) -> list[np.ndarray]:
    return [np.array(to_numpy(a)) for a in arrays]


def snapshot(params, opt) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]], int]:
    state = opt.state
    return host(params), {s: host(state[s]) for s in opt.slots}, int(state["step"])


def assert_unchanged(before, params, opt) -> None:
    p0, slots0, step0 = before
    for got, want in zip(host(params), p0, strict=True):
        np.testing.assert_array_equal(got, want)
    for s, arrays in slots0.items():
        for got, want in zip(host(opt.state[s]), arrays, strict=True):
            np.testing.assert_array_equal(got, want)
    assert int(opt.state["step"]) == step0


def run_step(be, W, b, x, y, opt) -> float:
    """One train step, its loss read back (where a GPU backend raises a deferred error)."""
    value, *_ = be.train_step(W, b, x, y, "tanh", "softmax", "cross_entropy", opt, opt.state)
    loss = float(value)
    be.synchronize()
    return loss


@pytest.mark.parametrize(("batch", "good"), [(1, 2), (9, 2), (9, 0)], ids=["b1", "b9", "first"])
@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_a_step_whose_new_parameters_overflow_changes_nothing(
    backend_name, rng, label, batch, good
):
    """``good`` good steps first (momentum and Adam state non-zero; on the GPU the third step
    replays the captured graph, the first runs eagerly), then one with ``lr = 1e39``, beyond
    float32: the loss and gradients are finite, the new parameters are not. Before the fix this
    returned normally with infinite weights (issue: ``train_step(SGD(lr=1e39))``)."""
    be = fresh(backend_name)
    W, b, x, y = problem(rng, batch)
    W, b = [be.asarray(w).copy() for w in W], [be.asarray(v).copy() for v in b]
    x, y = be.asarray(x), be.asarray(y)
    opt = OPTIMIZERS[label](1e-2)
    opt.bind(None, be, [tuple(p.shape) for p in W + b], np.float32)
    for _ in range(good):
        assert np.isfinite(run_step(be, W, b, x, y, opt))
    before = snapshot(W + b, opt)
    if backend_name == "cupy" and be.graphs and good:  # the bad step replays the graph
        assert [type(s.graph).__name__ for s in be._steps.values()] == ["Graph"]
    opt.lr = 1e39  # as a schedule would set it: the next step reads the new value
    with pytest.raises(gpubp.NonFiniteLossError):
        run_step(be, W, b, x, y, opt)
    assert_unchanged(before, W + b, opt)
    opt.lr = 1e-2  # and the run goes on from the last good step
    assert np.isfinite(run_step(be, W, b, x, y, opt))
    assert int(opt.state["step"]) == good + 1


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_apply_update_checks_every_parameter_before_writing_any(backend_name, rng, label):
    """Finite loss and gradients, a finite float32 lr, large parameters: only the last bias's
    update overflows, so a backend that updated in order would already have written the
    others. The error names the parameter."""
    be = fresh(backend_name)
    shapes = [(SIZES[i + 1], SIZES[i]) for i in range(3)] + [(n,) for n in SIZES[1:]]
    params = [be.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in shapes]
    params[-1][0] = 3e38
    grads = [be.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in shapes]
    grads[-1][0] = -1e38  # p - lr g = 3e38 + 1e38: beyond float32's 3.4e38
    opt = OPTIMIZERS[label](1.0)
    if label in ("adam", "adamw"):
        opt = optim.Adam(lr=2e38, decoupled=label == "adamw")  # p - lr m / sqrt(v) ~ 3e38 + 2e38
    opt.bind(None, be, shapes, np.float32)
    before = snapshot(params, opt)
    with pytest.raises(gpubp.NonFiniteLossError, match=r"b\[2\]"):
        be.apply_update(be.asarray(np.float32(0.5)), params, grads, opt, opt.state)
        be.synchronize()
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_a_non_finite_gradient_is_named(backend_name, rng, label):
    be = fresh(backend_name)
    shapes = [(SIZES[i + 1], SIZES[i]) for i in range(3)] + [(n,) for n in SIZES[1:]]
    params = [be.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in shapes]
    grads = [be.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in shapes]
    grads[1][2, 3] = np.nan
    opt = OPTIMIZERS[label](0.1)
    opt.bind(None, be, shapes, np.float32)
    before = snapshot(params, opt)
    with pytest.raises(gpubp.NonFiniteLossError, match=r"dW\[1\]"):
        be.apply_update(be.asarray(np.float32(0.5)), params, grads, opt, opt.state)
        be.synchronize()
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_large_but_finite_updates_are_applied(backend_name, rng, label):
    """Parameters near the top of float32 (beyond what the cheap NumPy bound accepts) with a
    finite result: the step is applied, with the values of the unchecked update (to rounding:
    the GPU's unchecked update is another kernel)."""
    be = fresh(backend_name)
    shapes = [(SIZES[i + 1], SIZES[i]) for i in range(3)] + [(n,) for n in SIZES[1:]]
    params = [be.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in shapes]
    params[1][0, 0] = 1e38
    grads = [be.asarray(rng.uniform(-1, 1, s).astype(np.float32)) for s in shapes]
    opt, plain = OPTIMIZERS[label](0.1), OPTIMIZERS[label](0.1)
    opt.bind(None, be, shapes, np.float32)
    plain.bind(None, be, shapes, np.float32)
    copies = [p.copy() for p in params]
    be.apply_update(be.asarray(np.float32(0.5)), params, grads, opt, opt.state)
    be.update_parameters(copies, grads, plain, plain.state)
    be.synchronize()
    for got, want in zip(host(params), host(copies), strict=True):
        assert rel_error(got, want) <= 1e-6  # relative to the tensor's largest value
    assert np.isfinite(host(params)[1]).all() and int(opt.state["step"]) == 1


# --- the Numba backend's update split over threads ---------------------------------------------


def splitting(threads: int = 2):
    """A Numba backend that splits every optimizer pass of 128 elements or more: the update's
    passes (its reads too) in 64-element chunks on the OpenMP pool."""
    pytest.importorskip("numba")
    from gpubp.backends.numba import NumbaBackend

    be = NumbaBackend(threads=threads)
    be.update_par_min = be.update_chunk = 64
    return be


SPLIT_SHAPES = [(37, 129), (1,), (300, 3), (129,), (2, 2)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_split_update_matches_the_reference(rng, label, dtype):
    from gpubp.backends.numba import checked

    be = splitting()
    params = [rng.normal(0, 1, s).astype(dtype) for s in SPLIT_SHAPES]
    p64 = [p.astype(np.float64) for p in params]
    start = [p.copy() for p in p64]
    opt, ref_opt = OPTIMIZERS[label](0.05), OPTIMIZERS[label](0.05)
    opt.bind(None, be, SPLIT_SHAPES, dtype)
    ref_state = {"step": 0}
    for slot in ref_opt.slots:
        ref_state[slot] = [np.zeros(s) for s in SPLIT_SHAPES]
    for _ in range(3):
        grads = [(rng.normal(0, 1, s) * 1e3).astype(dtype) for s in SPLIT_SHAPES]  # large
        be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
        p64, ref_state = ref.update_parameters(p64, grads, ref_opt, ref_state)
    plan = [*be._update_plans.values()][-1]  # the parallel kernel, over 64-element chunks
    assert plan.run in (checked.sgd_step_par, checked.adam_step_par) and len(plan.extra[0]) > 2
    for got, want, p0 in zip(params, p64, start, strict=True):  # the changes, not the params
        assert rel_error(got - p0, want - p0) <= TOLERANCE[dtype]
    for slot in opt.slots:
        for got, want in zip(opt.state[slot], ref_state[slot], strict=True):
            assert rel_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_the_chunk_plan_gives_each_thread_one_share_of_every_tensor(parts):
    """The rows come in ``parts`` blocks of one length (what a static schedule gives each
    thread); block ``t`` holds share ``t`` of every tensor, in one piece, within 64 elements of
    an equal share; every element is in exactly one row, and rows end at multiples of 64 (or
    a tensor's end) and hold at most a chunk."""
    pytest.importorskip("numba")
    from gpubp.backends.numba.checked import chunk_plan

    sizes, chunk = [1000, 10, 130, 64 * 7 + 5, 1, 4096], 256
    plan = chunk_plan(sizes, chunk, parts)
    assert plan.dtype == np.int64 and plan.shape[1] == 3 and len(plan) % parts == 0
    blocks = np.split(plan, parts)
    for k, n in enumerate(sizes):
        covered, end = np.zeros(n, dtype=int), 0
        for block in blocks:
            rows = block[(block[:, 0] == k) & (block[:, 2] > block[:, 1])]
            if len(rows):
                assert rows[0, 1] == end and (rows[1:, 1] == rows[:-1, 2]).all()
                end = rows[-1, 2]
            assert abs(rows[:, 2].sum() - rows[:, 1].sum() - n / parts) <= 64
            for _, lo, hi in rows:
                covered[lo:hi] += 1
                assert hi - lo <= chunk and lo % 64 == 0 and (hi % 64 == 0 or hi == n)
        assert end == n and (covered == 1).all()


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_split_update_checks_every_part_before_any_writes(rng, label):
    """The overflow is in the last elements (the second thread's part): the first part, checked
    clean, must not have been written either."""
    be = splitting()
    params = [rng.uniform(-1, 1, s).astype(np.float32) for s in SPLIT_SHAPES]
    grads = [rng.uniform(-1, 1, s).astype(np.float32) for s in SPLIT_SHAPES]
    params[-1].flat[-1] = 3e38
    grads[-1].flat[-1] = -1e38
    opt = OPTIMIZERS[label](1.0)
    if label in ("adam", "adamw"):
        opt = optim.Adam(lr=2e38, decoupled=label == "adamw")
    opt.bind(None, be, SPLIT_SHAPES, np.float32)
    before = snapshot(params, opt)
    with pytest.raises(gpubp.NonFiniteLossError, match=r"b\[2\]|W\[2\]"):
        be.apply_update(np.float32(0.5), params, grads, opt, opt.state)
    assert_unchanged(before, params, opt)


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_split_update_names_the_first_bad_tensor_as_the_serial_one_does(rng, label):
    """Two tensors overflow: the first in its second thread's share, the second in its first
    thread's share. The parallel check's rows go share by share, so its first bad row is the
    second tensor's; the step must still name the first tensor, as the serial kernel does."""
    shapes = [(256,), (256,)]
    errors = []
    for be in (splitting(threads=1), splitting()):
        params = [np.full(s, 0.5, np.float32) for s in shapes]
        grads = [np.full(s, 0.25, np.float32) for s in shapes]
        for tensor, at in ((0, -1), (1, 0)):
            params[tensor][at], grads[tensor][at] = 3e38, -1e38
        opt = OPTIMIZERS[label](1.0)
        if label in ("adam", "adamw"):
            opt = optim.Adam(lr=2e38, decoupled=label == "adamw")
        opt.bind(None, be, shapes, np.float32)
        before = snapshot(params, opt)
        with pytest.raises(gpubp.NonFiniteLossError) as caught:
            be.apply_update(np.float32(0.5), params, grads, opt, opt.state)
        assert_unchanged(before, params, opt)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "[0]" in errors[0], errors
    from gpubp.backends.numba import checked

    plan = [*be._update_plans.values()][-1]  # the second backend's: parallel, share by share
    assert plan.run in (checked.sgd_step_par, checked.adam_step_par)


@pytest.mark.parametrize("decay", ["adamw", "sgd_wd"])
def test_a_huge_decoupled_decay_changes_nothing(backend_name, decay):
    """lr and the weight decay each finite in float32, their product not: AdamW's shrink
    ``1 - lr wd`` is then -inf, so every weight would become -inf. The NumPy backend's norm
    proof once left the shrink out and wrote -inf weights without raising."""
    be = fresh(backend_name)
    W = [
        be.asarray(np.full((3, 4), 10.0, np.float32)),
        be.asarray(np.full((2, 3), 10.0, np.float32)),
    ]
    b = [be.asarray(np.full(3, 10.0, np.float32)), be.asarray(np.full(2, 10.0, np.float32))]
    x, y = be.asarray(np.zeros((5, 4), np.float32)), be.asarray(np.array([0, 1, 0, 1, 1]))
    if decay == "adamw":
        opt = optim.AdamW(lr=1e19, weight_decay=1e19)
    else:
        opt = optim.SGD(lr=1e19, weight_decay=1e19)
    opt.bind(None, be, [tuple(p.shape) for p in W + b], np.float32)
    before = snapshot(W + b, opt)
    with pytest.raises(gpubp.NonFiniteLossError):
        run_step(be, W, b, x, y, opt)
    assert_unchanged(before, W + b, opt)
