"""The Numba backend's proof that an update is finite (instead of the exact check pass).

The proof (``gpubp.backends.numba.checked``) uses ``max |g|`` and the optimizer state's maxima
recorded by the previous write pass. Wherever it decides, the outcome must be the exact
check's: the same error with nothing changed, or the same (bit for bit) finite new values.
Each case is run twice from the same start, once as the backend runs it and once with the proof
switched off (the exact check pass always), on random extremes: huge learning rates, gradients
and state near the dtype's limits, NaN and infinite gradients.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp import optim
from gpubp import reference as ref
from gpubp.backends import update
from gpubp.check import TOLERANCE, rel_error

pytest.importorskip("numba")
from gpubp.backends.numba import NumbaBackend

SHAPES = [(37, 13), (5, 37), (1,), (37,), (5,)]  # sizes not multiples of 32
OPTIMIZERS = {
    "sgd": lambda lr: optim.SGD(lr=lr),
    "sgd_wd": lambda lr: optim.SGD(lr=lr, weight_decay=1e-2),
    "momentum": lambda lr: optim.SGD(lr=lr, momentum=0.9),
    "nesterov": lambda lr: optim.SGD(lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda lr: optim.Adam(lr=lr),
    "adam_l2": lambda lr: optim.Adam(lr=lr, weight_decay=1e-2, betas=(0.0, 0.5)),
    "adamw": lambda lr: optim.AdamW(lr=lr, weight_decay=1e-3),
}


def backends(split: bool) -> tuple[NumbaBackend, NumbaBackend]:
    """``(as shipped, exact check only)``: two fresh backends, split over 2 threads or not."""
    pair = []
    for _ in range(2):
        be = NumbaBackend(threads=2 if split else None)
        if split:  # the update's passes (and reads) over 64-element chunks on every thread
            be.update_par_min = be.update_chunk = 64
        pair.append(be)
    pair[1].prove_updates = False
    return pair[0], pair[1]


def run(be, params, grads, opt):
    """One checked step: ``None`` if it went through, else the error's message."""
    try:
        be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
    except gpubp.NonFiniteLossError as e:
        return str(e)
    return None


def copy_state(opt) -> dict:
    return {"step": opt.state["step"], **{s: [a.copy() for a in opt.state[s]] for s in opt.slots}}


def assert_same(a_params, a_opt, b_params, b_opt) -> None:
    for x, y in zip(a_params, b_params, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a_opt.state["step"] == b_opt.state["step"]
    for s in a_opt.slots:
        for x, y in zip(a_opt.state[s], b_opt.state[s], strict=True):
            np.testing.assert_array_equal(x, y)


def extreme(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Random values with a random magnitude up to the dtype's limit, sometimes NaN or inf."""
    top = np.log10(float(np.finfo(dtype).max))
    scale = 10.0 ** rng.uniform(-3, top) if rng.random() < 0.5 else 1.0
    a = (rng.uniform(-1, 1, shape) * scale).astype(dtype)
    if rng.random() < 0.15:
        a.flat[rng.integers(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return a


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_the_proof_decides_as_the_exact_check(rng, label, dtype, split):
    fast, exact = backends(split)
    top = float(np.finfo(dtype).max)
    for _ in range(24):
        lr = float(rng.choice([1e-3, 1e-3, 1.0, 1e3, 1e20, top / 4]))
        params = [rng.uniform(-1, 1, s).astype(dtype) for s in SHAPES]
        if rng.random() < 0.3:  # parameters near the limit too
            params[0] *= dtype_type(dtype)(top / 2)
        opts = [OPTIMIZERS[label](lr), OPTIMIZERS[label](lr)]
        for opt, be in zip(opts, (fast, exact)):
            opt.bind(None, be, SHAPES, dtype)
        pairs = [([p.copy() for p in params], opts[0]), ([p.copy() for p in params], opts[1])]
        if rng.random() < 0.3 and opts[0].slots:  # state near the limits, loaded
            saved = {"step": 3}
            for s in opts[0].slots:
                saved[s] = [np.abs(extreme(rng, sh, dtype)) for sh in SHAPES]
            for _, opt in pairs:
                opt.load_state_dict(saved, None, fast, SHAPES, dtype, check_values=False)
        for _ in range(5):  # the first step records the state's maxima, the next use them
            grads = [
                extreme(rng, s, dtype)
                if rng.random() < 0.5
                else rng.uniform(-1, 1, s).astype(dtype)
                for s in SHAPES
            ]
            before = ([p.copy() for p in pairs[0][0]], copy_state(pairs[0][1]))
            got = [
                run(be, ps, [g.copy() for g in grads], opt)
                for be, (ps, opt) in zip((fast, exact), pairs)
            ]
            assert got[0] == got[1]
            assert_same(*pairs[0], *pairs[1])
            if got[0] is not None:  # rejected: nothing changed
                for x, y in zip(pairs[0][0], before[0], strict=True):
                    np.testing.assert_array_equal(x, y)
                assert pairs[0][1].state["step"] == before[1]["step"]
                for s in pairs[0][1].slots:
                    for x, y in zip(pairs[0][1].state[s], before[1][s], strict=True):
                        np.testing.assert_array_equal(x, y)
            else:
                for a in [*pairs[0][0], *(a for s in opts[0].slots for a in opts[0].state[s])]:
                    assert np.isfinite(a).all()
    assert fast.update_counts["proved"], "the proof never applied: the test would not test it"
    assert not exact.update_counts["proved"]


def dtype_type(dtype):
    return np.dtype(dtype).type


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_proved_steps_match_the_reference(rng, label):
    """Ordinary steps (the proof applies from the second one on) against the float64 reference."""
    be, _ = backends(False)
    params = [rng.normal(0, 1, s).astype(np.float32) for s in SHAPES]
    p64 = [p.astype(np.float64) for p in params]
    start = [p.copy() for p in p64]
    opt, ref_opt = OPTIMIZERS[label](0.05), OPTIMIZERS[label](0.05)
    opt.bind(None, be, SHAPES, np.float32)
    ref_state = {"step": 0, **{s: [np.zeros(sh) for sh in SHAPES] for s in ref_opt.slots}}
    for _ in range(4):
        grads = [(rng.normal(0, 1, s) * 1e3).astype(np.float32) for s in SHAPES]
        be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
        p64, ref_state = ref.update_parameters(p64, grads, ref_opt, ref_state)
    # proved from the first step on, but the first with state (whose maxima are not known yet)
    assert be.update_counts["proved"] >= 3 and be.update_counts["checked"] <= 1
    for got, want, p0 in zip(params, p64, start, strict=True):
        assert rel_error(got - p0, want - p0) <= TOLERANCE["float32"]
    for slot in opt.slots:
        for got, want in zip(opt.state[slot], ref_state[slot], strict=True):
            assert rel_error(got, want) <= TOLERANCE["float32"]


def test_the_state_maxima_live_in_the_state_and_other_writers_drop_them(rng):
    be, _ = backends(False)
    opt = optim.Adam(lr=1e-3)
    opt.bind(None, be, SHAPES, np.float32)
    params = [rng.uniform(-1, 1, s).astype(np.float32) for s in SHAPES]
    grads = [rng.uniform(-1, 1, s).astype(np.float32) for s in SHAPES]
    assert update.MAXIMA not in opt.state  # created: unknown
    be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
    m = max(float(np.abs(a).max()) for a in opt.state["exp_avg"])
    v = max(float(a.max()) for a in opt.state["exp_avg_sq"])
    assert opt.state[update.MAXIMA] == (m, v, 0.0)
    be.update_parameters(params, grads, opt, opt.state)  # unchecked: dropped
    assert update.MAXIMA not in opt.state
    be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
    assert update.MAXIMA in opt.state
    update.UpdateOps.checked_update(be, np.float32(1.0), params, grads, opt, opt.state)
    assert update.MAXIMA not in opt.state  # the staged check wrote it: dropped
    be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
    opt.load_state_dict(opt.state_dict(), None, be, SHAPES, np.float32)  # new state: unknown
    assert update.MAXIMA not in opt.state
    assert update.MAXIMA not in opt.state_dict()  # never saved with the state


def test_a_negative_loaded_second_moment_is_never_proved(rng):
    """A second moment loaded negative: the step after loading is decided by the exact check
    (the maxima are unknown then), which rejects it where ``sqrt(v')`` would be NaN."""
    be, _ = backends(False)
    opt = optim.Adam(lr=1e-3, betas=(0.9, 0.0))  # v' = g^2 (b2 = 0): finite however v was
    saved = {
        "step": 2,
        "exp_avg": [np.zeros(s, np.float32) for s in SHAPES],
        "exp_avg_sq": [np.full(s, -1.0, np.float32) for s in SHAPES],
    }
    opt.load_state_dict(saved, None, be, SHAPES, np.float32, check_values=False)  # on purpose
    opt2 = optim.Adam(lr=1e-3, betas=(0.9, 0.5))  # v' = 0.5 v + 0.5 g^2 < 0 for small g
    opt2.load_state_dict(saved, None, be, SHAPES, np.float32, check_values=False)
    params = [rng.uniform(-1, 1, s).astype(np.float32) for s in SHAPES]
    grads = [np.full(s, 1e-3, np.float32) for s in SHAPES]
    be.apply_update(np.float32(1.0), params, grads, opt, opt.state)
    assert all(np.isfinite(p).all() for p in params)
    before = [p.copy() for p in params]
    with pytest.raises(gpubp.NonFiniteLossError):
        be.apply_update(np.float32(1.0), params, grads, opt2, opt2.state)
    for x, y in zip(params, before, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu", "identity"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_passes_bound_every_gradient(rng, activation, dtype):
    """The bound the train step hands the proof (from the maxima its passes take) is at least
    ``max |g|`` over every gradient, so the update needs no read pass of its own."""
    from gpubp.backends.numba.update import gradient_bound

    be = NumbaBackend()
    sizes = [19, 33, 7, 3]
    W = [rng.normal(0, 3, (sizes[i + 1], sizes[i])).astype(dtype) for i in range(3)]
    b = [rng.normal(0, 3, sizes[i + 1]).astype(dtype) for i in range(3)]
    x = (rng.normal(0, 10, (1 + int(rng.integers(0, 40)), sizes[0]))).astype(dtype)
    y = rng.integers(0, 3, x.shape[0])
    ws, _, _, bounds = be._backprop(W, b, x, y, activation, "softmax", "cross_entropy", False, True)
    G = gradient_bound(bounds, ws.db)
    biggest = max(float(np.abs(g).max()) for g in [*ws.dW, *ws.db])
    assert np.isfinite(G) and G >= biggest


def test_a_non_finite_activation_makes_the_bound_infinite():
    """A NaN or infinity among the activations (an overflow in a forward GEMM) gives an
    infinite bound, so the proof never covers a gradient it did not see."""
    from gpubp.backends.numba import kernels as K

    for bad in (np.nan, np.inf):
        z = np.ones((4, 5), np.float32)
        z[2, 3] = bad
        cm = np.empty(10, np.float32)
        assert K.bias_act(z, np.zeros(5, np.float32), K.IDENTITY, cm) == np.inf


DECAYING = {  # rules whose state decays by a factor where the gradient is zero, and the factors
    "momentum": (lambda: optim.SGD(lr=0.05, momentum=0.9), (0.9,)),
    "nesterov": (lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True), (0.9,)),
    "adam": (lambda: optim.Adam(lr=1e-3), (0.9, 0.999)),
    "adamw": (lambda: optim.AdamW(lr=1e-3, weight_decay=1e-2, betas=(0.5, 0.99)), (0.5, 0.99)),
}


@pytest.mark.parametrize("split", [False, True], ids=["serial", "split"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("label", list(DECAYING))
def test_state_that_decays_below_the_smallest_normal_is_stored_as_zero(rng, label, dtype, split):
    """A state entry whose gradient is zero decays by ``b1``, ``b2`` or ``mu`` each step; once
    it falls below the dtype's smallest normal number it is stored as exactly zero (subnormal
    arithmetic costs a microcode assist on x86), and one that is subnormal already becomes
    zero; a small normal one (``sqrt(tiny)``: below float32's smallest normal in float64) is
    kept. Everything else is as the float64 reference has it. Two steps: the first decided by
    the exact check (a loaded state has no maxima), the second by the proof on one backend and
    the exact check on the other, which write the same bits."""
    make, factors = DECAYING[label]
    tiny = np.finfo(dtype).tiny
    fast, exact = backends(split)
    params = [rng.uniform(-1, 1, s).astype(dtype) for s in SHAPES]
    grads = [rng.uniform(-1, 1, s).astype(dtype) for s in SHAPES]
    still = [rng.random(s) < 0.5 for s in SHAPES]  # where the gradient is zero
    for g, z in zip(grads, still, strict=True):
        g[z] = 0
    opts = [make(), make()]
    saved = {"step": 4}
    for k, slot in enumerate(opts[0].slots):
        # just above tiny (falls below it), subnormal, small but normal, ordinary
        near = [tiny * rng.uniform(1.0, 1.0 + (1 - factors[k]) / 2, s) for s in SHAPES]
        sub = [tiny * rng.uniform(0.0, 1.0, s) for s in SHAPES]
        small = [np.sqrt(tiny) * rng.uniform(1.0, 2.0, s) for s in SHAPES]
        big = [np.abs(rng.normal(0, 1, s)) for s in SHAPES]
        sign = -1.0 if slot != "exp_avg_sq" else 1.0
        saved[slot] = [
            np.choose(rng.integers(0, 4, n.shape), [n * sign, s, m * sign, b]).astype(dtype)
            for n, s, m, b in zip(near, sub, small, big, strict=True)
        ]
        assert any(((a != 0) & (np.abs(a) < tiny)).any() for a in saved[slot])  # subnormals in
    pairs = []
    for opt, be in zip(opts, (fast, exact)):
        opt.load_state_dict(saved, None, be, SHAPES, dtype)
        pairs.append(([p.copy() for p in params], opt))
    ref_opt = make()
    p64 = [p.astype(np.float64) for p in params]
    ref_state = {"step": 4, **{s: [a.astype(np.float64) for a in saved[s]] for s in ref_opt.slots}}
    want = {s: [a.copy() for a in saved[s]] for s in opts[0].slots}
    for _ in range(2):
        for be, (ps, opt) in zip((fast, exact), pairs):
            be.apply_update(dtype_type(dtype)(1.0), ps, [g.copy() for g in grads], opt, opt.state)
        assert_same(*pairs[0], *pairs[1])
        p64, ref_state = ref.update_parameters(p64, grads, ref_opt, ref_state)
        for k, slot in enumerate(opts[0].slots):  # where g is 0: the dtype's b * old, kept
            for w, z in zip(want[slot], still, strict=True):
                decayed = w[z] * dtype_type(dtype)(factors[k])
                w[z] = np.where(np.abs(decayed) < tiny, 0, decayed)
    assert fast.update_counts["proved"] >= 1 and not exact.update_counts["proved"]
    got_params, opt = pairs[0]
    for got, ref64 in zip(got_params, p64, strict=True):  # (two roundings of p: not its change)
        assert rel_error(got, ref64) <= TOLERANCE[dtype]
    seen = []
    for slot in opt.slots:
        for got, w, z in zip(opt.state[slot], want[slot], still, strict=True):
            assert not ((got != 0) & (np.abs(got) < tiny)).any(), f"a subnormal {slot} was kept"
            np.testing.assert_array_equal(got[z], w[z])
            seen.append(w[z])
    every = np.abs(np.concatenate(seen))
    assert (every == 0).any() and ((every > 0) & (every < 1e-15)).any()  # flushed; small kept
