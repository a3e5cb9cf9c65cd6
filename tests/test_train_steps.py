"""Many training steps in one native call (``Backend.train_steps``, the Numba backend's
``gpubp.backends.numba.multistep``), and the loop that hands it runs of batches.

Every step taken together must be the step taken alone, bit for bit; a step the call cannot
finish (a loss that is not finite, a folded step whose proof fails, a rejected update) is left
whole to the ordinary step, which decides it as it would alone.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp import optim
from gpubp.backends.base import Backend
from gpubp.backends.update import MAXIMA
from gpubp.errors import NonFiniteLossError
from gpubp.loop import EpochLoop

pytest.importorskip("numba")
from gpubp.backends.numba import NumbaBackend, multistep
from gpubp.backends.numba.tuner import ThreadTuner

SIZES = (37, 45, 29, 5)
BATCH = 17
N = BATCH * 9 + 5  # nine full batches and a partial one

RULES = {
    "sgd": lambda: optim.SGD(lr=0.05),
    "sgd-decay": lambda: optim.SGD(lr=0.05, weight_decay=0.01),
    "nesterov": lambda: optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optim.Adam(lr=1e-2),
    "adamw": lambda: optim.AdamW(lr=1e-2, weight_decay=0.1),
}


def _model(task: str, dtype: str, sizes=SIZES) -> gpubp.MLP:
    cls = task == "classification"
    return gpubp.MLP(
        list(sizes),
        activation="tanh" if dtype == "float64" else "relu",
        output="softmax" if cls else "identity",
        loss="cross_entropy" if cls else "mse",
        backend="numba",
        dtype=dtype,
        seed=5,
    )


def _data(rng, task: str, dtype: str, sizes=SIZES, n=N):
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    if task == "classification":
        return X, rng.integers(0, sizes[-1], n).astype(np.int64)
    return X, rng.standard_normal((n, sizes[-1])).astype(dtype)


def _train(model, opt, X, y, order, lrs, together: bool):
    """Every full batch of ``order``: first as many as ``MLP.steps`` takes (if ``together``),
    then the rest one by one with ``MLP.step``; the losses and how many went together."""
    n = len(lrs)
    losses = model.steps(X, y, order, 0, n, BATCH, opt, lrs) if together else []
    taken = len(losses)
    for i in range(taken, n):
        opt.lr = lrs[i]
        idx = order[i * BATCH : (i + 1) * BATCH]
        losses.append(float(model.step(X[idx], y[idx], opt)))
    return losses, taken


def _state(opt, model):
    return opt.bind(model, model.backend, model.parameter_shapes, model.dtype)


def _same_state(opt_a, a, opt_b, b) -> None:
    """The optimizer states the same: step count, every slot bit for bit, the kept maxima."""
    sa, sb = _state(opt_a, a), _state(opt_b, b)
    assert sa["step"] == sb["step"]
    assert sa.get(MAXIMA) == sb.get(MAXIMA)
    for slot in opt_a.slots:
        for x, y in zip(sa[slot], sb[slot], strict=True):
            np.testing.assert_array_equal(x, y)


def _same(a: gpubp.MLP, b: gpubp.MLP) -> None:
    for x, y in zip([*a.get_parameters()[0], *a.get_parameters()[1]],
                    [*b.get_parameters()[0], *b.get_parameters()[1]]):  # fmt: skip
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steps_together_are_the_steps_one_by_one(rng, rule, task, dtype):
    X, y = _data(rng, task, dtype)
    order = rng.permutation(N)
    lrs = [RULES[rule]().lr * (1.0 - 0.05 * i) for i in range(N // BATCH)]  # a schedule
    alone, together = _model(task, dtype), _model(task, dtype)
    opt_a, opt_t = RULES[rule](), RULES[rule]()
    la, _ = _train(alone, opt_a, X, y, order, lrs, together=False)
    lt, taken = _train(together, opt_t, X, y, order, lrs, together=True)
    assert taken == len(lrs), "every full batch should have gone in one call"
    assert lt == la
    _same(together, alone)
    assert opt_t.lr == opt_a.lr == lrs[-1]
    _same_state(opt_t, together, opt_a, alone)
    assert _state(opt_t, together)["step"] == len(lrs)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_parallel_update_and_a_tuned_thread_count_change_nothing(rng, rule):
    """A network big enough for the update's parallel pass, on two threads with the tuner
    cutting the runs: still the one-by-one bits."""
    sizes = (300, 200, 10)
    X, y = _data(rng, "classification", "float32", sizes, n=BATCH * 40)
    order = rng.permutation(len(X))
    lrs = [RULES[rule]().lr] * 40
    models = []
    for together in (False, True):
        m = gpubp.MLP(list(sizes), backend=NumbaBackend(threads=2), seed=1)
        _train(m, RULES[rule](), X, y, order, lrs, together)
        models.append(m)
    _same(*models)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_step_whose_loss_overflows_is_left_to_the_step_which_refuses_it(rng, rule):
    X, y = _data(rng, "classification", "float32")
    order = rng.permutation(N)
    X[order[4 * BATCH + 3]] = 3e38  # in the fifth batch: the forward pass overflows
    lrs = [RULES[rule]().lr] * (N // BATCH)
    model, twin = _model("classification", "float32"), _model("classification", "float32")
    opt, opt_twin = RULES[rule](), RULES[rule]()
    assert len(model.steps(X, y, order, 0, len(lrs), BATCH, opt, lrs)) == 4
    _train(twin, opt_twin, X, y, order, lrs[:4], together=False)
    _same(model, twin)  # four steps written, the fifth not at all
    idx = order[4 * BATCH : 5 * BATCH]
    with pytest.raises(NonFiniteLossError):
        model.step(X[idx], y[idx], opt)
    _same(model, twin)


@pytest.mark.parametrize("rule", ["sgd", "adam", "nesterov"])
def test_a_step_the_update_rejects_is_left_whole(rng, rule):
    """A learning rate beyond float32 at the third step: two steps written, and
    the ordinary step refuses the third with nothing changed, as it would alone."""
    X, y = _data(rng, "regression", "float32")
    order = rng.permutation(N)
    lrs = [RULES[rule]().lr] * (N // BATCH)
    lrs[2] = 1e39  # beyond float32: its update is infinite
    model, twin = _model("regression", "float32"), _model("regression", "float32")
    opt, opt_twin = RULES[rule](), RULES[rule]()
    taken = len(model.steps(X, y, order, 0, len(lrs), BATCH, opt, lrs))
    assert taken == 2
    _train(twin, opt_twin, X, y, order, lrs[:2], together=False)
    _same(model, twin)
    opt.lr = lrs[2]
    idx = order[2 * BATCH : 3 * BATCH]
    with pytest.raises(NonFiniteLossError):
        model.step(X[idx], y[idx], opt)
    _same(model, twin)


def test_the_numpy_backend_takes_no_steps_together(rng):
    X, y = _data(rng, "classification", "float32")
    model = gpubp.MLP(list(SIZES), backend="numpy", dtype="float32", seed=0)
    assert model.steps(X, y, np.arange(N), 0, 3, BATCH, optim.Adam(), [1e-3] * 3) is None


def test_unsupported_targets_take_no_steps_together(rng):
    """Float class labels (not int64) are left to the ordinary step, which converts them."""
    X, y = _data(rng, "classification", "float32")
    model = _model("classification", "float32")
    got = model.steps(X, y.astype(np.float32), np.arange(N), 0, 3, BATCH, optim.Adam(), [1e-3] * 3)
    assert got is None


class _Recorder:
    """A ``steps`` for :class:`EpochLoop` that takes at most ``limit`` batches per call (the
    rest of each run refused), with a loss per batch equal to its index."""

    def __init__(self, limit: int) -> None:
        self.limit, self.calls, self.batches = limit, [], []

    def __call__(self, order, first, count):
        self.calls.append((first, count))
        took = list(range(first, first + min(count, self.limit)))
        self.batches += took
        return [float(b) for b in took]


@pytest.mark.parametrize("limit", [0, 1, 3, 1000])
def test_the_loop_covers_every_batch_once_whoever_takes_it(limit):
    n, bs = 103, 10  # ten full batches and a partial one
    rec, alone = _Recorder(limit), []

    def step(idx):
        alone.append(int(idx[0]) // bs)
        return float(int(idx[0]) // bs)

    losses = []
    loop = EpochLoop(gpubp.get_backend("numpy"), n, bs, 2, progress=False, echo=None)
    loop.run(step, lambda: np.arange(n), lambda end: losses.append(end.loss) or "", steps=rec)
    assert sorted(rec.batches + alone) == sorted(list(range(11)) * 2)
    assert alone.count(10) == 2  # the partial batch always goes alone
    assert alone[0] == 0  # the run's first step goes alone (it compiles, and it is timed)
    assert all(first + count <= 10 for first, count in rec.calls)  # full batches only
    mean = (sum(range(10)) * bs + 10 * 3) / n
    assert losses == [pytest.approx(mean)] * 2
    if limit == 0:  # a call that takes nothing is followed by a step alone, not a retry
        assert len(rec.calls) <= len(alone)


def test_a_stop_is_seen_between_runs():
    n, bs = 1000, 10
    rec = _Recorder(1000)
    stops = iter([False] * 3 + [True] * 100)
    loop = EpochLoop(gpubp.get_backend("numpy"), n, bs, 1, progress=False, echo=None)
    stopped = loop.run(
        lambda idx: 0.0, lambda: np.arange(n), lambda end: "", stop=lambda: next(stops), steps=rec
    )
    assert stopped and loop.pos.batch < 100


def test_run_length_never_crosses_a_decision():
    """Steps taken in one call are recorded at the count they ran at: a run never goes past
    the end of a probe, a hold or the first window."""
    tuner = ThreadTuner(2, load=None)
    for _ in range(3000):
        n, k = tuner.threads(), tuner.run_length()
        assert k >= 1
        for _ in range(k - 1):
            tuner.record(1e-3 if n == 2 else 2e-3, 128)
            assert tuner.threads() == n  # no change inside the run
        tuner.record(1e-3 if n == 2 else 2e-3, 128)


def test_fit_takes_its_full_batches_together(rng, monkeypatch):
    """MLP.fit on the Numba backend: the full batches go through train_steps, and the result
    is the fit whose backend takes none together."""
    X, y = _data(rng, "classification", "float32")
    a, b = _model("classification", "float32"), _model("classification", "float32")
    ha = a.fit(X, y, epochs=2, batch_size=BATCH, progress=False)
    monkeypatch.setattr(type(b.backend), "train_steps", Backend.train_steps)
    hb = b.fit(X, y, epochs=2, batch_size=BATCH, progress=False)
    assert ha["loss"] == hb["loss"]
    _same(a, b)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_label_out_of_range_is_left_to_the_step_which_refuses_it(rng, rule):
    X, y = _data(rng, "classification", "float32")
    order = rng.permutation(N)
    y[order[2 * BATCH + 5]] = SIZES[-1]  # in the third batch
    lrs = [RULES[rule]().lr] * (N // BATCH)
    model, twin = _model("classification", "float32"), _model("classification", "float32")
    opt, opt_twin = RULES[rule](), RULES[rule]()
    assert len(model.steps(X, y, order, 0, len(lrs), BATCH, opt, lrs)) == 2
    _train(twin, opt_twin, X, y, order, lrs[:2], together=False)
    _same(model, twin)
    _same_state(opt, model, opt_twin, twin)
    idx = order[2 * BATCH : 3 * BATCH]
    with pytest.raises(ValueError, match="label"):
        model.step(X[idx], y[idx], opt)
    _same(model, twin)


@pytest.mark.parametrize(
    ("kernel", "rule"), [("fold_steps", "sgd"), ("adam_steps", "adam"), ("sgd_steps", "nesterov")]
)
def test_an_interrupted_run_counts_the_steps_it_wrote(rng, monkeypatch, kernel, rule):
    """Ctrl-C lands when the kernel returns: the steps it wrote are counted (the optimizer's
    step count and rate, the state's maxima), so training on agrees with one by one."""
    real = getattr(multistep, kernel)

    def interrupted(*args):
        real(*args)
        raise KeyboardInterrupt

    X, y = _data(rng, "classification", "float32")
    order = rng.permutation(N)
    lrs = [RULES[rule]().lr * (1 + i) for i in range(N // BATCH)]
    model, twin = _model("classification", "float32"), _model("classification", "float32")
    opt, opt_twin = RULES[rule](), RULES[rule]()
    monkeypatch.setattr(multistep, kernel, interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.steps(X, y, order, 0, 4, BATCH, opt, lrs[:4])
    monkeypatch.setattr(multistep, kernel, real)
    _train(twin, opt_twin, X, y, order, lrs[:4], together=False)
    _same(model, twin)
    _same_state(opt, model, opt_twin, twin)
    assert opt.lr == opt_twin.lr


def test_the_update_check_without_the_proof_and_a_folding_cut_change_nothing(rng, monkeypatch):
    """``prove_updates = False`` (every step's exact check) and a rate whose ``lr wd > 1``
    stops the folded SGD run: still the steps one by one, state included."""
    X, y = _data(rng, "regression", "float32")
    order = rng.permutation(N)
    rules = {"adam": RULES["adam"], "sgd-decay": lambda: optim.SGD(lr=0.05, weight_decay=2.0)}
    for rule, lrs in (("adam", [1e-2] * 9), ("sgd-decay", [0.05] * 4 + [0.6] + [0.05] * 4)):
        runs = []
        for together in (False, True):  # (the fifth step's lr wd = 1.2: not folded)
            model, opt = _model("regression", "float32"), rules[rule]()
            monkeypatch.setattr(model.backend, "prove_updates", False)
            losses, _ = _train(model, opt, X, y, order, lrs, together)
            runs.append((model, opt, losses))
        (a, oa, la), (b, ob, lb) = runs
        assert la == lb
        _same(a, b)
        _same_state(oa, a, ob, b)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (dict(order=np.arange(N, dtype=float)), TypeError),
        (dict(order=np.arange(N) - 1), IndexError),
        (dict(count=N // BATCH + 1), ValueError),
        (dict(first=-1), ValueError),
        (dict(lrs=[1e-3]), ValueError),
        (dict(batch_size=N + 1, count=1), ValueError),
    ],
)
def test_a_run_outside_the_data_is_refused_with_nothing_changed(rng, change, error):
    X, y = _data(rng, "classification", "float32")
    model = _model("classification", "float32")
    before = model.get_parameters()
    call = dict(order=rng.permutation(N), first=0, count=3, batch_size=BATCH, lrs=[1e-3] * 3)
    call.update(change)
    with pytest.raises(error):
        model.steps(X, y, call["order"], call["first"], call["count"], call["batch_size"],
                    optim.Adam(), call["lrs"])  # fmt: skip
    after = model.get_parameters()
    for p, q in zip([*before[0], *before[1]], [*after[0], *after[1]]):
        np.testing.assert_array_equal(p, q)


def test_a_backend_that_takes_none_is_asked_once(rng):
    """None from ``steps`` (this backend never takes runs): every later batch goes alone,
    without asking again."""
    calls = []
    loop = EpochLoop(gpubp.get_backend("numpy"), 100, 10, 2, progress=False, echo=None)
    loop.run(lambda idx: 0.0, lambda: np.arange(100), lambda end: "",
             steps=lambda *a: calls.append(a) or None)  # fmt: skip
    assert len(calls) == 1
