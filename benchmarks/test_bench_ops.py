"""Per-op and whole-train-step benchmarks of every available backend (pytest-benchmark).

Each benchmark first checks its op against :mod:`gpubp.reference` on fresh data (on the first
``Case.check_batch`` rows where the full batch would keep the float64 reference busy for long),
then times the op on the full batch with the device synchronised inside the timed region, and
records GFLOP/s and GB/s (the least traffic the op needs: every input read once, every output
written once) in ``extra_info``.
"""

from __future__ import annotations

import numpy as np
import pytest
from bench_cases import Case, assert_close, run_and_record

from gpubp import reference as ref
from gpubp.bench import BackendCandidate, make_problem, step_flops


def test_forward_layer(benchmark, case: Case):
    """Layer 1: ``relu((B, n0) @ (n1, n0).T + b)``."""
    be, B = case.be, case.batch
    n1, n0 = case.sizes[1], case.sizes[0]
    small = case.arrays(case.check_batch)
    got = be.forward_layer(*case.device([small["x"], small["W"][0], small["b"][0]]), "relu")
    expected = ref.forward_layer(small["x"], small["W"][0], small["b"][0], "relu")
    assert_close(got, expected, case.tol, "forward_layer")

    d = case.arrays(B, seed=1)
    x, W, b = case.device([d["x"], d["W"][0], d["b"][0]])
    out = be.zeros((B, n1), case.dtype)
    scratch = be.zeros((B, n1), case.dtype)
    isz = np.dtype(case.dtype).itemsize
    run_and_record(
        benchmark,
        case,
        lambda: be.forward_layer(x, W, b, "relu", out=out, scratch=scratch),
        2 * B * n0 * n1,
        isz * (B * n0 + n1 * n0 + n1 + B * n1),
    )


def test_hidden_delta(benchmark, case: Case):
    """Layer 1's delta: ``((B, n2) @ (n2, n1)) * relu'(a^1)``."""
    if len(case.sizes) < 3:
        pytest.skip("a network without hidden layers has no hidden delta")
    be, B = case.be, case.batch
    n1, n2 = case.sizes[1], case.sizes[2]
    small = case.arrays(case.check_batch)
    args = [small["d"][1], small["W"][1], small["a"][0]]
    got = be.hidden_delta(*case.device(args), "relu")
    assert_close(got, ref.hidden_delta(*args, "relu"), case.tol, "hidden_delta")

    d = case.arrays(B, seed=1)
    dn, W, a = case.device([d["d"][1], d["W"][1], d["a"][0]])
    out = be.zeros((B, n1), case.dtype)
    scratch = be.zeros((B, n1), case.dtype)
    isz = np.dtype(case.dtype).itemsize
    run_and_record(
        benchmark,
        case,
        lambda: be.hidden_delta(dn, W, a, "relu", out=out, scratch=scratch),
        2 * B * n2 * n1,
        isz * (B * n2 + n2 * n1 + 2 * B * n1),
    )


def test_output_delta_and_loss(benchmark, case: Case):
    """Softmax + cross-entropy on integer labels: ``delta^L`` ``(B, nL)`` and the loss."""
    be, B, n = case.be, case.batch, case.sizes[-1]
    small = case.arrays(case.check_batch)
    delta, value = be.output_delta(
        *case.device([small["z"], small["y"]]), "softmax", "cross_entropy"
    )
    rdelta, rvalue = ref.output_delta(small["z"], small["y"], "softmax", "cross_entropy")
    assert_close(delta, rdelta, case.tol, "output_delta: delta")
    assert_close(np.float64(value), rvalue, case.tol, "output_delta: loss")

    d = case.arrays(B, seed=1)
    z, y = case.device([d["z"], d["y"]])
    out = be.zeros((B, n), case.dtype)
    scratch = be.zeros((B, n), case.dtype)
    rowbuf = be.zeros((B, 1), case.dtype)
    isz = np.dtype(case.dtype).itemsize
    run_and_record(
        benchmark,
        case,
        lambda: be.output_delta(
            z, y, "softmax", "cross_entropy", out=out, scratch=scratch, rowbuf=rowbuf
        ),
        6 * B * n,  # max, subtract, exp, sum, divide, subtract the one-hot rows
        isz * 2 * B * n + 8 * B,
    )


def test_parameter_gradients(benchmark, case: Case):
    """Layer 1: ``dW = (n1, B) @ (B, n0)`` and ``db = sum over B``."""
    be, B = case.be, case.batch
    n1, n0 = case.sizes[1], case.sizes[0]
    small = case.arrays(case.check_batch)
    dW, db = be.parameter_gradients(*case.device([small["d"][0], small["x"]]))
    rdW, rdb = ref.parameter_gradients(small["d"][0], small["x"])
    assert_close(dW, rdW, case.tol, "parameter_gradients: dW")
    assert_close(db, rdb, case.tol, "parameter_gradients: db")

    d = case.arrays(B, seed=1)
    delta, x = case.device([d["d"][0], d["x"]])
    dW_out = be.zeros((n1, n0), case.dtype)
    db_out = be.zeros((n1,), case.dtype)
    isz = np.dtype(case.dtype).itemsize
    run_and_record(
        benchmark,
        case,
        lambda: be.parameter_gradients(delta, x, dW=dW_out, db=db_out),
        2 * B * n1 * n0 + B * n1,
        isz * (B * n1 + B * n0 + n1 * n0 + n1),
    )


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_parameter_update(benchmark, case: Case, optimizer: str):
    """One optimizer step on ``W^1`` ``(n1, n0)`` in place (SGD with momentum 0.9, or Adam)."""
    be = case.be
    d = case.arrays(1)
    p0 = d["W"][0]
    g = (d["W"][0] * 0.01 + 1e-3).astype(case.dtype)
    m0 = (g * 0.5).astype(case.dtype)
    v0 = (g * g).astype(case.dtype)
    p, grad, m, v = case.device([p0.copy(), g, m0.copy(), v0.copy()])
    scratch = be.zeros((2 * p0.size,), case.dtype)
    if optimizer == "adam":

        def step():
            be.adam_update(p, grad, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, scratch=scratch)

        expected, *_ = ref.adam_update(p0, g, m0, v0, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0, False)
        traffic = 7  # read p, g, m, v; write p, m, v
    else:

        def step():
            be.sgd_update(p, grad, m, 0.01, 0.9, False, 0.0, scratch=scratch)

        expected, _ = ref.sgd_update(p0, g, m0, 0.01, 0.9, False, 0.0)
        traffic = 5  # read p, g, buf; write p, buf
    step()
    be.synchronize()
    # the change is compared, its scale floored at one rounding unit of the largest parameter
    p64 = p0.astype(np.float64)
    floor = float(np.finfo(case.dtype).eps) / case.tol * float(np.max(np.abs(p64)))
    change = be.to_numpy(p).astype(np.float64) - p64
    assert_close(change, expected - p64, case.tol, f"{optimizer} update", floor)
    isz = np.dtype(case.dtype).itemsize
    run_and_record(benchmark, case, step, 0, traffic * p0.size * isz)


def test_train_step(benchmark, case: Case):
    """A whole step: forward, softmax + cross-entropy, backward, plain SGD (as ``gpubp bench``)."""
    c = BackendCandidate(case.backend)
    check = make_problem(case.sizes, case.check_batch, case.dtype)
    c.setup(check)
    err = c.validate(check)
    assert err <= case.tol, f"train_step: relative error {err:.2e} against the reference"
    if case.check_batch != case.batch:
        c.setup(make_problem(case.sizes, case.batch, case.dtype, with_reference=False))
    c.step()  # first-call costs (the workspace) are not what is measured
    # every round is one step from the initial parameters: many steps on one batch would
    # memorise it and end in float underflow, which is slow and not what training looks like
    isz = np.dtype(case.dtype).itemsize
    params = sum(
        case.sizes[i] * case.sizes[i + 1] + case.sizes[i + 1] for i in range(len(case.sizes) - 1)
    )
    acts = case.batch * sum(case.sizes)
    run_and_record(
        benchmark,
        case,
        c.step,
        step_flops(case.sizes, case.batch),
        isz * (3 * params + 2 * acts),  # parameters read twice and written; activations in, out
        setup=c.reset,
    )
