"""Bad input is refused with an error that names the argument and says what was expected, and a
refused call leaves the parameters and the optimizer state exactly as they were.

Also: a training step whose loss or gradients come out non-finite raises
:class:`gpubp.NonFiniteLossError` and keeps parameters and optimizer state as before that step.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import gpubp
from gpubp import optim

BACKENDS = gpubp.available_backends()
N_IN, N_OUT, B = 4, 3, 5
#: The input checks (gpubp.model_inputs) are the same code on every backend, written against the
#: backend's array module: the grids below run on this one, and
#: test_every_backend_refuses_every_bad_input runs every case on every backend in one test each.
GRID_BACKEND = "numpy"
X_METHODS = ("train_step", "gradients", "evaluate", "forward", "predict")
Y_METHODS = ("train_step", "gradients", "evaluate")


# --- helpers --------------------------------------------------------------------------------


def flat(params) -> list:
    """``W^1..W^L, b^1..b^L`` from ``(weights, biases)``."""
    W, b = params
    return [*W, *b]


def snapshot(model: gpubp.MLP, opt: optim.Optimizer):
    W, b = model.get_parameters()
    return [a.copy() for a in W + b], opt.state_dict()


def assert_unchanged(before, model: gpubp.MLP, opt: optim.Optimizer) -> None:
    params, state = before
    W, b = model.get_parameters()
    assert len(W + b) == len(params)
    for got, want in zip(W + b, params):
        np.testing.assert_array_equal(got, want)
    now = opt.state_dict()
    assert now.keys() == state.keys()
    assert now["step"] == state["step"]
    for slot in state:
        if slot != "step":
            for got, want in zip(now[slot], state[slot]):
                np.testing.assert_array_equal(got, want)


def good_batch(loss: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N_IN)).astype(np.float32)
    if loss == "cross_entropy":
        y = rng.integers(0, N_OUT, B)
    elif loss == "binary_cross_entropy":
        y = (rng.random((B, N_OUT)) > 0.5).astype(np.float32)
    else:
        y = rng.standard_normal((B, N_OUT)).astype(np.float32)
    return x, y


MODELS = {
    "cross_entropy": {"output": "softmax", "loss": "cross_entropy"},
    "binary_cross_entropy": {"output": "sigmoid", "loss": "binary_cross_entropy"},
    "mse": {"output": "identity", "loss": "mse"},
}
OPTIMIZERS = {
    "adam": lambda: optim.Adam(lr=0.01),
    "momentum": lambda: optim.SGD(lr=0.05, momentum=0.9),
}


def trained(loss: str, opt_name: str = "adam", backend: str | None = None, steps: int = 3):
    """A model and its optimizer after a few good steps, so the optimizer state is non-trivial."""
    m = gpubp.MLP([N_IN, 6, N_OUT], backend=backend or BACKENDS[0], seed=0, **MODELS[loss])
    opt = OPTIMIZERS[opt_name]()
    for k in range(steps):
        m.train_step(*good_batch(loss, seed=100 + k), opt)
    return m, opt


def check_message(exc: BaseException, argument: str, words: tuple[str, ...]) -> None:
    msg = str(exc)
    assert re.search(rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])", msg), (
        f"the message should name the argument {argument!r}: {msg!r}"
    )
    for word in words:
        assert re.search(word, msg, re.IGNORECASE), f"expected {word!r} in {msg!r}"


def call(method: str, m: gpubp.MLP, opt: optim.Optimizer, x, y):
    """``m.<method>`` on ``(x, y)`` (``y`` unused by forward and predict)."""
    return {
        "train_step": lambda: m.train_step(x, y, opt),
        "gradients": lambda: m.gradients(x, y),
        "evaluate": lambda: m.evaluate(x, y),
        "forward": lambda: m.forward(x),
        "predict": lambda: m.predict(x),
    }[method]()


def assert_refused(m, opt, method, x, y, error, argument, words) -> None:
    """The call raises ``error`` naming ``argument`` and ``words``, and changes nothing."""
    before = snapshot(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(error) as info:
            call(method, m, opt, x, y)
    check_message(info.value, argument, words)
    assert_unchanged(before, m, opt)


def _with(a, index, value):
    a = np.array(a, dtype=np.float32)
    a[index] = value
    return a


# --- bad x ------------------------------------------------------------------------------------

X_GOOD = np.random.default_rng(0).standard_normal((B, N_IN)).astype(np.float32)

BAD_X = [
    pytest.param(np.ones((B, N_IN - 1)), ValueError, (r"\(batch, 4\)",), id="too-narrow"),
    pytest.param(np.ones((B, N_IN + 2)), ValueError, (r"\(batch, 4\)",), id="too-wide"),
    pytest.param(np.ones(N_IN), ValueError, (r"\(batch, 4\)", r"\[None, :\]"), id="1d-one-sample"),
    pytest.param(np.ones(7), ValueError, (r"\(batch, 4\)",), id="1d"),
    pytest.param(np.ones((B, N_IN, 1)), ValueError, (r"\(batch, 4\)",), id="3d"),
    pytest.param(np.float32(1.0), ValueError, (r"\(batch, 4\)",), id="scalar"),
    pytest.param(np.ones((0, N_IN)), ValueError, ("empty",), id="empty-batch"),
    pytest.param([], ValueError, (r"\(batch, 4\)|empty",), id="empty-list"),
    pytest.param(np.full((B, N_IN), "a"), TypeError, ("dtype", "float"), id="strings"),
    pytest.param(np.array([[1, None, 2, 3]] * B, dtype=object), TypeError, ("dtype",), id="object"),
    pytest.param(np.ones((B, N_IN), dtype=np.complex64), TypeError, ("dtype",), id="complex"),
    pytest.param(
        np.array(["2020-01-01"] * (B * N_IN), dtype="datetime64[D]").reshape(B, N_IN),
        TypeError,
        ("dtype",),
        id="datetime",
    ),
    pytest.param([[1, 2, 3, 4], [1, 2]], TypeError, ("array|list",), id="ragged"),
    pytest.param([[1, 2, 3, 4], [1, 2, "x", 4]], TypeError, ("dtype|number",), id="mixed"),
    pytest.param(_with(X_GOOD, (2, 1), np.nan), ValueError, ("NaN",), id="nan"),
    pytest.param(_with(X_GOOD, (0, 0), np.inf), ValueError, ("inf",), id="inf"),
    pytest.param(_with(X_GOOD, (4, 3), -np.inf), ValueError, ("inf",), id="-inf"),
    pytest.param(
        _with(_with(X_GOOD, (0, 0), np.inf), (1, 0), -np.inf), ValueError, ("inf",), id="+-inf"
    ),
    pytest.param(
        np.full((B, N_IN), 1e300),
        ValueError,
        ("inf|float32|range|overflow",),
        id="float64-beyond-float32-range",
    ),
]


@pytest.mark.parametrize("method", X_METHODS)
@pytest.mark.parametrize(("x", "error", "words"), BAD_X)
def test_bad_x(x, error, words, method):
    m, opt = trained("cross_entropy", backend=GRID_BACKEND)
    assert_refused(m, opt, method, x, np.zeros(B, dtype=np.int64), error, "x", words)


@pytest.mark.parametrize(("x", "error", "words"), BAD_X)
def test_bad_x_in_fit(x, error, words):
    m, opt = trained("cross_entropy")
    before = snapshot(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(error) as info:
            m.fit(x, np.zeros(B, dtype=np.int64), epochs=1, optimizer=opt, progress=False)
    check_message(info.value, "X", words)
    assert_unchanged(before, m, opt)


# --- bad y ------------------------------------------------------------------------------------

ONE_HOT = np.eye(N_OUT, dtype=np.float32)[[0, 1, 2, 0, 1]]

BAD_Y = [
    # cross-entropy: labels (B,) or one-hot rows (B, 3)
    pytest.param(
        "cross_entropy", np.zeros(B - 1, np.int64), ValueError, ("rows",), id="ce-few-rows"
    ),
    pytest.param(
        "cross_entropy", np.zeros(B + 1, np.int64), ValueError, ("rows",), id="ce-many-rows"
    ),
    pytest.param("cross_entropy", np.zeros((B, 2)), ValueError, (r"\(batch, 3\)",), id="ce-2-cols"),
    pytest.param("cross_entropy", np.zeros((B, 3, 1)), ValueError, (r"\(batch",), id="ce-3d"),
    pytest.param("cross_entropy", np.int64(1), ValueError, (r"\(batch",), id="ce-scalar"),
    pytest.param(
        "cross_entropy",
        np.array([0, 1, -1, 0, 1]),
        ValueError,
        ("-1", r"\[0, 2\]"),
        id="ce-negative-label",
    ),
    pytest.param(
        "cross_entropy",
        np.array([0, 1, 3, 0, 1]),
        ValueError,
        ("3", r"\[0, 2\]"),
        id="ce-label-equals-n_out",
    ),
    pytest.param(
        "cross_entropy",
        np.array([0, 1, 99, 0, 1], np.uint8),
        ValueError,
        (r"\[0, 2\]",),
        id="ce-uint8-out-of-range",
    ),
    pytest.param(
        "cross_entropy",
        np.array([0.0, 1.0, 2.5, 0.0, 1.0]),
        ValueError,
        (r"y\[2\] is 2.5", "whole numbers", "loss='mse'"),
        id="ce-fractional-float-labels",
    ),
    pytest.param("cross_entropy", ONE_HOT * 2, ValueError, ("one-hot",), id="ce-rows-sum-2"),
    pytest.param(
        "cross_entropy", _with(ONE_HOT, (1, 1), 0), ValueError, ("one-hot",), id="ce-zero-row"
    ),
    pytest.param(
        "cross_entropy",
        _with(_with(ONE_HOT, (0, 0), 2), (0, 1), -1),
        ValueError,
        ("one-hot",),
        id="ce-negative-entry-sums-to-1",
    ),
    pytest.param(
        "cross_entropy", _with(ONE_HOT, (3, 2), np.nan), ValueError, ("NaN",), id="ce-nan"
    ),
    pytest.param(
        "cross_entropy",
        np.full(B, "a"),
        TypeError,
        ("dtype", r"np.unique\(y, return_inverse=True\)", "MLPClassifier"),
        id="ce-strings",
    ),
    pytest.param(
        "cross_entropy", np.zeros(B, np.complex128), TypeError, ("dtype",), id="ce-complex"
    ),
    pytest.param(
        "cross_entropy",
        np.array([0, 1, None, 0, 1], dtype=object),
        TypeError,
        ("dtype",),
        id="ce-object",
    ),
    pytest.param(
        "cross_entropy",
        [[1, 0, 0], [0, 1]] + [[1, 0, 0]] * 3,
        TypeError,
        ("array|list",),
        id="ce-ragged",
    ),
    # binary cross-entropy: (B, 3) in [0, 1]
    pytest.param(
        "binary_cross_entropy",
        np.full((B, N_OUT), 1.5, np.float32),
        ValueError,
        (r"\[0, 1\]",),
        id="bce-above-1",
    ),
    pytest.param(
        "binary_cross_entropy",
        np.full((B, N_OUT), -0.1, np.float32),
        ValueError,
        (r"\[0, 1\]",),
        id="bce-below-0",
    ),
    pytest.param(
        "binary_cross_entropy",
        np.zeros(B, np.int64),
        ValueError,
        (r"\(batch, 3\)",),
        id="bce-1d-with-3-outputs",
    ),
    pytest.param(
        "binary_cross_entropy", np.full((B, N_OUT), np.nan), ValueError, ("NaN",), id="bce-nan"
    ),
    pytest.param(
        "binary_cross_entropy", np.zeros((B - 2, N_OUT)), ValueError, ("rows",), id="bce-few-rows"
    ),
    # MSE with 3 outputs: (B, 3) floats or (B,) integer labels
    pytest.param("mse", np.full(B, 0.5), ValueError, ("whole numbers",), id="mse-float-1d"),
    pytest.param("mse", np.zeros((B, 2)), ValueError, (r"\(batch, 3\)",), id="mse-2-cols"),
    pytest.param(
        "mse", np.array([0, 1, 2, 3, 0]), ValueError, (r"\[0, 2\]",), id="mse-label-out-of-range"
    ),
    pytest.param("mse", np.full((B, N_OUT), np.inf), ValueError, ("inf",), id="mse-inf"),
    pytest.param(
        "mse",
        np.full((B, N_OUT), 1e300),
        ValueError,
        ("inf|float32|range|overflow",),
        id="mse-float64-beyond-float32-range",
    ),
]


@pytest.mark.parametrize("method", Y_METHODS)
@pytest.mark.parametrize(("loss", "y", "error", "words"), BAD_Y)
def test_bad_y(loss, y, error, words, method):
    m, opt = trained(loss, backend=GRID_BACKEND)
    assert_refused(m, opt, method, good_batch(loss)[0], y, error, "y", words)


def test_every_backend_refuses_every_bad_input(backend_name):
    """Every case of the two grids above, by every method, on each backend: a backend whose
    arrays took another path through the checks (or bypassed them) fails here."""
    models = {loss: trained(loss, backend=backend_name) for loss in MODELS}
    m, opt = models["cross_entropy"]
    for case in BAD_X:
        x, error, words = case.values
        for method in X_METHODS:
            y = np.zeros(B, dtype=np.int64)
            try:
                assert_refused(m, opt, method, x, y, error, "x", words)
            except (Exception, pytest.fail.Exception) as exc:  # say which case
                raise AssertionError(f"bad x {case.id!r} by {method}: {exc}") from exc
    for case in BAD_Y:
        loss, y, error, words = case.values
        m, opt = models[loss]
        for method in Y_METHODS:
            try:
                assert_refused(m, opt, method, good_batch(loss)[0], y, error, "y", words)
            except (Exception, pytest.fail.Exception) as exc:
                raise AssertionError(f"bad y {case.id!r} by {method}: {exc}") from exc


@pytest.mark.parametrize(("loss", "y", "error", "words"), BAD_Y)
def test_bad_y_in_fit(loss, y, error, words):
    m, opt = trained(loss)
    before = snapshot(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(error) as info:
            m.fit(good_batch(loss)[0], y, epochs=1, optimizer=opt, progress=False)
    check_message(info.value, "y", words)
    assert_unchanged(before, m, opt)


def test_bce_single_output_targets_outside_unit_interval():
    m = gpubp.MLP([N_IN, 6, 1], output="sigmoid", loss="binary_cross_entropy")
    opt = optim.Adam()
    x = good_batch("mse")[0]
    m.train_step(x, np.array([0, 1, 1, 0, 1]), opt)
    before = snapshot(m, opt)
    with pytest.raises(ValueError) as info:
        m.train_step(x, np.array([0, 1, 2, 0, 1]), opt)
    check_message(info.value, "y", (r"\[0, 1\]",))
    assert_unchanged(before, m, opt)


def test_bad_validation_data_in_fit():
    m, opt = trained("cross_entropy")
    before = snapshot(m, opt)
    x, y = good_batch("cross_entropy")
    cases = [
        ((x,), ValueError, "validation_data", ()),
        ((x, y, y), ValueError, "validation_data", ()),
        (x, ValueError, "validation_data", ()),
        ((x[:, :2], y), ValueError, "validation_data[0]", (r"\(batch, 4\)",)),
        ((x, y[:3]), ValueError, "validation_data[1]", ("rows",)),
        ((x, y + 5), ValueError, "validation_data[1]", (r"\[0, 2\]",)),
    ]
    for vd, error, argument, words in cases:
        with pytest.raises(error) as info:
            m.fit(x, y, epochs=1, optimizer=opt, validation_data=vd, progress=False)
        check_message(info.value, argument, words)
        assert_unchanged(before, m, opt)


@pytest.mark.parametrize("argument", ["epochs", "batch_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, None, "3"])
def test_bad_fit_counts(argument, value):
    m, opt = trained("cross_entropy")
    before = snapshot(m, opt)
    x, y = good_batch("cross_entropy")
    with pytest.raises((ValueError, TypeError)) as info:
        m.fit(x, y, optimizer=opt, progress=False, **{argument: value})
    check_message(info.value, argument, ("positive|int",))
    assert_unchanged(before, m, opt)


@pytest.mark.parametrize("method", ["forward", "evaluate"])
@pytest.mark.parametrize("value", [0, -1, 1.5, None])
def test_bad_inference_batch_size(method, value):
    """forward/evaluate take batch_size too; a bad one must be refused by name, never give
    garbage (batch_size=-1 would slice the batch into an uninitialised array)."""
    m = gpubp.MLP([N_IN, 6, N_OUT], seed=0)
    x, y = good_batch("cross_entropy")
    with pytest.raises((ValueError, TypeError)) as info:
        if method == "forward":
            m.forward(x, batch_size=value)
        else:
            m.evaluate(x, y, batch_size=value)
    check_message(info.value, "batch_size", ("positive|int",))


# --- bad optimizer ----------------------------------------------------------------------------


class _LooksLikeAnOptimizer:
    kind = "sgd"
    lr = 0.1
    momentum = 0.0
    nesterov = False
    weight_decay = 0.0
    state = None


@pytest.mark.parametrize(
    "bad", ["adam", None, 0.1, optim.SGD, _LooksLikeAnOptimizer()], ids=lambda v: repr(v)[:20]
)
def test_unknown_optimizer_type(bad):
    m, opt = trained("cross_entropy")
    before = snapshot(m, opt)
    x, y = good_batch("cross_entropy")
    with pytest.raises(TypeError) as info:
        m.train_step(x, y, bad)
    check_message(info.value, "optimizer", ("SGD|optim",))
    assert_unchanged(before, m, opt)


def test_optimizer_of_another_model_is_refused():
    m, opt = trained("cross_entropy")
    other = gpubp.MLP([N_IN, 6, N_OUT], seed=1)
    before = snapshot(m, opt)
    other_before = other.get_parameters()
    with pytest.raises(ValueError, match="optimizer"):
        other.train_step(*good_batch("cross_entropy"), opt)
    assert_unchanged(before, m, opt)
    for a, c in zip(flat(other.get_parameters()), flat(other_before)):
        np.testing.assert_array_equal(a, c)


# --- non-finite loss --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_non_finite_loss_from_huge_weights_and_inputs(opt_name, backend):
    m, opt = trained("cross_entropy", opt_name, backend=backend)
    W, b = m.get_parameters()
    m.set_parameters([np.full_like(w, 1e20) for w in W], b)
    before = snapshot(m, opt)
    assert before[1]["step"] == 3
    x = np.full((B, N_IN), 1e30, dtype=np.float32)  # finite in float32
    y = np.zeros(B, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gpubp.NonFiniteLossError) as info:
            m.train_step(x, y, opt)
    assert "learning rate" in str(info.value) or "input" in str(info.value)
    assert_unchanged(before, m, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_non_finite_loss_from_huge_inputs_only(opt_name, backend):
    m, opt = trained("cross_entropy", opt_name, backend=backend)
    before = snapshot(m, opt)
    x = np.full((B, N_IN), 3e38, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gpubp.NonFiniteLossError):
            m.train_step(x, np.zeros(B, dtype=np.int64), opt)
    assert_unchanged(before, m, opt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_loss_with_finite_gradients_is_refused(backend):
    """Outputs ~4e20 off their targets: the float32 loss (a sum of their squares) is inf, while
    every gradient and the tiny step stay finite; the loss alone must stop the step. (A backend
    that sums the loss in float64, as the Numba kernels do, gets a finite loss here.)"""
    m = gpubp.MLP([N_IN, N_OUT], output="identity", loss="mse", backend=backend, seed=0)
    W, b = m.get_parameters()
    m.set_parameters([np.full_like(W[0], 1e20)], b)
    x = np.ones((B, N_IN), np.float32)
    y = np.zeros((B, N_OUT), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value, dWs, dbs = m.gradients(x, y)
        if np.isfinite(value):
            pytest.skip(f"backend {backend!r} sums the loss in float64: {value:g}, finite")
        assert value == np.inf and all(np.isfinite(g).all() for g in dWs + dbs)  # the premise
        opt = optim.SGD(lr=1e-30)
        before = snapshot(m, opt)
        with pytest.raises(gpubp.NonFiniteLossError, match="loss"):
            m.train_step(x, y, opt)
    assert_unchanged(before, m, opt)


@pytest.mark.parametrize("opt_name", ["sgd", "momentum"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_gradient_beside_an_infinite_activation_is_refused(backend, opt_name):
    """x = 2 times a weight of 3e38: the hidden ReLU unit is inf, the output ReLU of -inf is 0
    and equals its target, so the loss and every delta are 0, but dW[1] = 0 * inf is NaN. A
    bound on the gradients taken as delta times activation must not read 0 * inf as 0 (plain
    SGD: the Numba backend's folded step; momentum, after a first good step: its proof)."""
    m = gpubp.MLP([1, 1, 1], activation="relu", output="relu", loss="mse", backend=backend)
    opt = optim.SGD(lr=0.1) if opt_name == "sgd" else optim.SGD(lr=0.1, momentum=0.9)
    y = np.array([[0.0]], np.float32)
    m.set_parameters([[[1.0]], [[1.0]]], [[0.0], [0.0]])
    m.train_step(np.array([[0.5]], np.float32), y, opt)  # the state's maxima now known
    m.set_parameters([[[3e38]], [[-1.0]]], [[0.0], [0.0]])
    before = snapshot(m, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gpubp.NonFiniteLossError, match="gradient"):
            m.train_step(np.array([[2.0]], np.float32), y, opt)
    assert_unchanged(before, m, opt)


DIVERGING = {
    "adam": lambda: optim.Adam(lr=1e30),
    "adamw": lambda: optim.AdamW(lr=1e30),
    "momentum": lambda: optim.SGD(lr=1e3, momentum=0.9),
    "nesterov": lambda: optim.SGD(lr=1e3, momentum=0.9, nesterov=True),
    "sgd": lambda: optim.SGD(lr=1e4),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt_name", list(DIVERGING))
def test_diverging_learning_rate_raises_and_keeps_last_good_state(opt_name, backend):
    m = gpubp.MLP([N_IN, 8, N_OUT], backend=backend, seed=0)
    opt = DIVERGING[opt_name]()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, N_IN)).astype(np.float32)
    y = rng.integers(0, N_OUT, 16)
    good_steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(200):
            before = snapshot(m, opt)
            try:
                m.train_step(x, y, opt)
            except gpubp.NonFiniteLossError:
                break
            good_steps += 1
        else:
            pytest.fail("a learning rate this large should diverge within 200 steps")
    assert good_steps >= 1, "the optimizer state should be non-trivial when the step fails"
    assert before[1]["step"] == good_steps
    assert_unchanged(before, m, opt)
    # the kept parameters and state are still usable: finite, and training goes on from them
    assert all(np.isfinite(p).all() for p in before[0])
    for slot, arrays in before[1].items():
        if slot != "step":
            assert all(np.isfinite(a).all() for a in arrays), slot


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_after_non_finite_step_training_continues_as_if_it_never_happened(opt_name):
    m, opt = trained("cross_entropy", opt_name)
    twin, twin_opt = trained("cross_entropy", opt_name)
    bad_x = np.full((B, N_IN), 3e38, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gpubp.NonFiniteLossError):
            m.train_step(bad_x, np.zeros(B, dtype=np.int64), opt)
    x, y = good_batch("cross_entropy", seed=7)
    assert m.train_step(x, y, opt) == twin.train_step(x, y, twin_opt)
    assert_unchanged(snapshot(twin, twin_opt), m, opt)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_non_finite_first_step_leaves_a_fresh_optimizer_fresh(opt_name):
    m = gpubp.MLP([N_IN, 6, N_OUT], seed=0)
    opt = OPTIMIZERS[opt_name]()
    before_params = m.get_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gpubp.NonFiniteLossError):
            m.train_step(np.full((B, N_IN), 3e38, np.float32), np.zeros(B, np.int64), opt)
    for a, c in zip(flat(m.get_parameters()), flat(before_params)):
        np.testing.assert_array_equal(a, c)
    state = opt.state_dict()
    assert state["step"] == 0
    for slot, arrays in state.items():
        if slot != "step":
            assert all(not a.any() for a in arrays), f"{slot} should still be zero"


def test_whole_number_float_labels_are_class_labels():
    """``np.loadtxt`` reads labels as float64: whole numbers are class labels, exactly as the
    same integers; a string label's hint leads to integers, never to floats."""
    x = np.random.default_rng(0).normal(size=(6, N_IN)).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0, 2])
    m, twin = gpubp.MLP([N_IN, 4, 3], seed=0), gpubp.MLP([N_IN, 4, 3], seed=0)
    assert m.train_step(x, labels.astype(np.float64), optim.SGD(lr=0.1)) == twin.train_step(
        x, labels, optim.SGD(lr=0.1)
    )
    with pytest.raises(TypeError) as info:
        m.fit(x, np.array(list("abcabc")), epochs=1, progress=False)
    assert "float32" not in str(info.value)


def test_boolean_labels_are_class_labels():
    """``y`` of dtype bool: 0/1 class labels for a classifier, 0.0/1.0 targets otherwise."""
    x = np.random.default_rng(0).normal(size=(6, N_IN)).astype(np.float32)
    labels = np.array([True, False, True, True, False, False])
    m = gpubp.MLP([N_IN, 4, 2], seed=0)
    twin = gpubp.MLP([N_IN, 4, 2], seed=0)
    assert m.train_step(x, labels, optim.SGD(lr=0.1)) == twin.train_step(
        x, labels.astype(np.int64), optim.SGD(lr=0.1)
    )
    bce = gpubp.MLP([N_IN, 4, 1], output="sigmoid", loss="binary_cross_entropy", seed=0)
    assert np.isfinite(bce.train_step(x, labels, optim.SGD(lr=0.1)))
