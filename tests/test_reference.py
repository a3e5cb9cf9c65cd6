"""The float64 reference against central finite differences and against direct formulas.

The reference is the judge of every backend, so it is judged here by things that do not share
its code: a finite-difference derivative of a loss written naively in this file, and the loss
formulas written out the textbook way.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubp import reference as ref
from gpubp.check import combinations

COMBINATIONS = combinations()

#: Layer sizes ``(n_0, ..., n_L)``: 1, 2 and 4 weight layers, widths 1, 3 and 33.
FD_SIZES: tuple[tuple[int, ...], ...] = ((3, 1), (1, 3), (5, 33, 3), (2, 1, 3), (4, 3, 33, 3, 2))
FD_BATCHES = (1, 7)
FD_TOLERANCE = 1e-6
#: Finite-difference step; the 4-point central stencil's error is O(h^4) (about 1e-16 here), so
#: what is left is rounding, about eps * |C| / h.
FD_STEP = 1e-4
#: ReLU-family pre-activations closer than this to their kink are redrawn, so no finite-difference
#: probe (at most 2 h away, times the chain-rule factors) crosses it.
KINK_MARGIN = 5e-3


# --- an independent, naive network and loss ------------------------------------------------


def _softmax_naive(z: np.ndarray) -> np.ndarray:
    e = np.exp(z)  # no shift: fine for the moderate logits used with it, overflows for large ones
    return e / e.sum(axis=1, keepdims=True)


NAIVE_ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "softmax": _softmax_naive,
}

#: ``f'(z)`` computed from ``z`` (not from ``a``, as the reference does).
NAIVE_DERIVATIVES = {
    "identity": lambda z: np.ones_like(z),
    "sigmoid": lambda z: np.exp(-z) / (1.0 + np.exp(-z)) ** 2,
    "tanh": lambda z: 1.0 / np.cosh(z) ** 2,
    "relu": lambda z: (z > 0).astype(np.float64),
    "leaky_relu": lambda z: np.where(z > 0, 1.0, 0.01),
}


def onehot(labels: np.ndarray, n: int) -> np.ndarray:
    Y = np.zeros((labels.shape[0], n))
    Y[np.arange(labels.shape[0]), labels] = 1.0
    return Y


def naive_targets(y: np.ndarray, n: int) -> np.ndarray:
    """Integer labels become one-hot rows (whatever ``n`` is); float targets are kept."""
    if y.dtype.kind in "iu":
        return onehot(y, n)
    return y.reshape(y.shape[0], n)


def naive_loss(z: np.ndarray, y: np.ndarray, output: str, loss: str) -> float:
    """The loss from the output pre-activation, written the textbook way (no stabilisation)."""
    B, n = z.shape
    Y = naive_targets(y, n)
    if loss == "mse":
        return float(np.sum((NAIVE_ACTIVATIONS[output](z) - Y) ** 2) / (2 * B))
    if loss == "cross_entropy":
        return float(-np.sum(Y * np.log(_softmax_naive(z))) / B)
    assert loss == "binary_cross_entropy"
    s = 1.0 / (1.0 + np.exp(-z))
    return float(-np.sum(Y * np.log(s) + (1.0 - Y) * np.log(1.0 - s)) / B)


def naive_forward(weights, biases, x, activation):
    """Pre-activations of every layer, the output layer's left before its activation."""
    zs = []
    a = x
    for i, (W, b) in enumerate(zip(weights, biases)):
        z = a @ W.T + b
        zs.append(z)
        if i < len(weights) - 1:
            a = NAIVE_ACTIVATIONS[activation](z)
    return zs


def naive_network_loss(weights, biases, x, y, activation, output, loss) -> float:
    return naive_loss(naive_forward(weights, biases, x, activation)[-1], y, output, loss)


def make_targets(rng, batch: int, n: int, output: str, loss: str) -> np.ndarray:
    if loss == "cross_entropy":
        return rng.integers(0, n, batch)
    if loss == "binary_cross_entropy":
        return (rng.random((batch, n)) < 0.5).astype(np.float64)
    if output in ("sigmoid", "softmax"):
        return rng.random((batch, n))
    return rng.normal(0.0, 1.0, (batch, n))


def make_problem(rng, sizes, batch, activation, output, loss):
    """Random parameters and data, redrawn until no ReLU-family unit sits on its kink."""
    kinked = activation in ("relu", "leaky_relu"), output == "relu"
    for _ in range(200):
        weights = [
            rng.normal(0.0, 1.0 / np.sqrt(sizes[i]), (sizes[i + 1], sizes[i]))
            for i in range(len(sizes) - 1)
        ]
        biases = [rng.normal(0.0, 0.5, sizes[i + 1]) for i in range(len(sizes) - 1)]
        x = rng.normal(0.0, 1.0, (batch, sizes[0]))
        zs = naive_forward(weights, biases, x, activation)
        watched = (zs[:-1] if kinked[0] else []) + (zs[-1:] if kinked[1] else [])
        if all(np.min(np.abs(z)) > KINK_MARGIN for z in watched):
            y = make_targets(rng, batch, sizes[-1], output, loss)
            return weights, biases, x, y
    raise AssertionError("could not draw a problem away from the ReLU kinks")  # pragma: no cover


def central_difference(f, params: list[np.ndarray], h: float = FD_STEP) -> list[np.ndarray]:
    """``dC/dp`` for every entry of every array in ``params`` (changed in place, then restored),
    by the 4-point central stencil ``(-f(p+2h) + 8 f(p+h) - 8 f(p-h) + f(p-2h)) / 12h``."""
    grads = []
    for p in params:
        g = np.zeros_like(p)
        flat, gflat = p.reshape(-1), g.reshape(-1)
        for k in range(flat.size):
            orig = flat[k]
            values = []
            for step in (2 * h, h, -h, -2 * h):
                flat[k] = orig + step
                values.append(f())
            flat[k] = orig
            # differences first: a probe that leaves C unchanged gives exactly 0
            gflat[k] = (8 * (values[1] - values[2]) - (values[0] - values[3])) / (12 * h)
        grads.append(g)
    return grads


def normwise_error(g_fd: np.ndarray, g: np.ndarray) -> float:
    """``||g_fd - g|| / max(||g_fd||, ||g||)`` (0 when both are exactly zero)."""
    scale = max(float(np.linalg.norm(g_fd)), float(np.linalg.norm(g)))
    diff = float(np.linalg.norm(g_fd - g))
    return diff / scale if scale > 0 else diff


# --- gradients against finite differences --------------------------------------------------


def _fd_cases() -> list:
    """Every combination x size x batch, except that a network without a hidden layer runs
    one hidden activation only: it never applies it, so the others would repeat the case."""
    first = COMBINATIONS[0][0]
    return [
        pytest.param(
            a, o, loss, sizes, batch, id=f"{a}-{o}-{loss}-{'-'.join(map(str, sizes))}-{batch}"
        )
        for a, o, loss in COMBINATIONS
        for sizes in FD_SIZES
        for batch in FD_BATCHES
        if len(sizes) > 2 or a == first
    ]


def _cross_entropy_one_output_xfail(sizes, loss):
    """See test_gradients_match_finite_differences: the one-output cross-entropy case."""
    if loss == "cross_entropy" and sizes[-1] == 1:
        return True
    return False


@pytest.mark.parametrize(("activation", "output", "loss", "sizes", "batch"), _fd_cases())
def test_gradients_match_finite_differences(request, rng, sizes, batch, activation, output, loss):
    if _cross_entropy_one_output_xfail(sizes, loss):
        # a softmax over one output is constant 1: the reference refuses rather than return a
        # gradient of a constant loss that is not zero
        weights, biases, x, y = make_problem(rng, sizes, batch, activation, output, loss)
        with pytest.raises(ValueError, match="at least 2 outputs"):
            ref.gradients(weights, biases, x, y, activation, output, loss)
        return
    weights, biases, x, y = make_problem(rng, sizes, batch, activation, output, loss)
    value, dWs, dbs = ref.gradients(weights, biases, x, y, activation, output, loss)

    L = len(weights)
    assert len(dWs) == len(dbs) == L
    for i in range(L):
        assert dWs[i].shape == weights[i].shape
        assert dbs[i].shape == biases[i].shape

    def f() -> float:
        return naive_network_loss(weights, biases, x, y, activation, output, loss)

    assert value == pytest.approx(f(), rel=1e-12, abs=1e-14)
    fd = central_difference(f, [*weights, *biases])
    errors = {}
    for i in range(L):
        errors[f"dW[{i}]"] = normwise_error(fd[i], dWs[i])
        errors[f"db[{i}]"] = normwise_error(fd[L + i], dbs[i])
    bad = {k: v for k, v in errors.items() if not v <= FD_TOLERANCE}
    assert not bad, f"relative errors above {FD_TOLERANCE}: {bad}"


def test_finite_difference_check_can_fail(rng):
    """The checker above notices a gradient that is off by 1e-4 relative, and a dropped factor."""
    weights, biases, x, y = make_problem(rng, (4, 5, 3), 7, "sigmoid", "softmax", "cross_entropy")
    _, dWs, dbs = ref.gradients(weights, biases, x, y, "sigmoid", "softmax", "cross_entropy")

    def f() -> float:
        return naive_network_loss(weights, biases, x, y, "sigmoid", "softmax", "cross_entropy")

    fd = central_difference(f, [*weights, *biases])
    assert normwise_error(fd[0], dWs[0]) <= FD_TOLERANCE
    assert normwise_error(fd[0], dWs[0] * (1 + 1e-4)) > FD_TOLERANCE
    # the gradient without the batch mean's 1/B
    assert normwise_error(fd[2], dbs[0] * 7) > FD_TOLERANCE


# --- loss values and output deltas against direct formulas -------------------------------------


@pytest.mark.parametrize("output", ["identity", "sigmoid", "tanh", "relu", "softmax"])
def test_output_delta_mse_matches_formula(rng, output):
    B, n = 7, 4
    z = rng.normal(0.0, 2.0, (B, n))
    Y = rng.random((B, n))
    delta, value = ref.output_delta(z, Y, output, "mse")
    a = NAIVE_ACTIVATIONS[output](z)
    assert isinstance(value, float)
    assert value == pytest.approx(np.sum((a - Y) ** 2) / (2 * B), rel=1e-13)
    g = (a - Y) / B
    if output == "softmax":
        # full Jacobian per row: J = diag(a) - a a^T (symmetric), delta = J^T g
        J = np.einsum("bi,ij->bij", a, np.eye(n)) - np.einsum("bi,bj->bij", a, a)
        expected = np.einsum("bji,bj->bi", J, g)
    else:
        expected = g * NAIVE_DERIVATIVES[output](z)
    assert delta.shape == (B, n)
    np.testing.assert_allclose(delta, expected, rtol=1e-12, atol=1e-15)


def test_output_delta_mse_integer_labels_are_onehot(rng):
    B, n = 5, 3
    z = rng.normal(0.0, 1.0, (B, n))
    labels = rng.integers(0, n, B)
    d_labels, v_labels = ref.output_delta(z, labels, "sigmoid", "mse")
    d_onehot, v_onehot = ref.output_delta(z, onehot(labels, n), "sigmoid", "mse")
    np.testing.assert_allclose(d_labels, d_onehot, rtol=1e-15)
    assert v_labels == pytest.approx(v_onehot, rel=1e-15)


@pytest.mark.parametrize("batch", [1, 7])
def test_output_delta_cross_entropy_matches_naive_formula(rng, batch):
    n = 5
    z = rng.normal(0.0, 3.0, (batch, n))
    labels = rng.integers(0, n, batch)
    delta, value = ref.output_delta(z, labels, "softmax", "cross_entropy")
    p = _softmax_naive(z)
    expected_value = -np.mean(np.log(p[np.arange(batch), labels]))
    assert value == pytest.approx(expected_value, rel=1e-13)
    np.testing.assert_allclose(delta, (p - onehot(labels, n)) / batch, rtol=1e-12, atol=1e-16)


def test_output_delta_cross_entropy_soft_targets(rng):
    B, n = 6, 4
    z = rng.normal(0.0, 2.0, (B, n))
    Y = rng.dirichlet(np.ones(n), B)  # probability rows
    delta, value = ref.output_delta(z, Y, "softmax", "cross_entropy")
    p = _softmax_naive(z)
    assert value == pytest.approx(-np.sum(Y * np.log(p)) / B, rel=1e-13)
    np.testing.assert_allclose(delta, (p - Y) / B, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (7, 3)])
def test_output_delta_binary_cross_entropy_matches_naive_formula(rng, shape):
    B = shape[0]
    z = rng.normal(0.0, 3.0, shape)
    Y = (rng.random(shape) < 0.5).astype(np.float64)
    delta, value = ref.output_delta(z, Y, "sigmoid", "binary_cross_entropy")
    s = 1.0 / (1.0 + np.exp(-z))
    expected_value = -np.sum(Y * np.log(s) + (1 - Y) * np.log(1 - s)) / B
    assert value == pytest.approx(expected_value, rel=1e-12)
    np.testing.assert_allclose(delta, (s - Y) / B, rtol=1e-12, atol=1e-16)


def test_cross_entropy_large_logits_stay_finite_and_exact():
    z = np.array([[1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 999.0], [1e3, 1e3, 1e3]])
    labels = np.array([1, 2, 0])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        naive = -np.mean(np.log(_softmax_naive(z)[np.arange(3), labels]))
    assert not np.isfinite(naive)  # the test is only worth something if the naive way breaks
    delta, value = ref.output_delta(z, labels, "softmax", "cross_entropy")
    # per row: logsumexp(z) - z[label] = 1000 + 0; (1000 + log(1 + e^-1)) - 999; log 3
    expected_rows = [1000.0, 1.0 + np.log1p(np.exp(-1.0)), np.log(3.0)]
    assert np.isfinite(value)
    assert value == pytest.approx(np.mean(expected_rows), rel=1e-14)
    lse = np.logaddexp.reduce(z, axis=1)
    assert value == pytest.approx(np.mean(lse - z[np.arange(3), labels]), rel=1e-14)
    p = np.exp(z - lse[:, None])
    assert np.all(np.isfinite(delta))
    np.testing.assert_allclose(delta, (p - onehot(labels, 3)) / 3, rtol=1e-12, atol=1e-300)


def test_binary_cross_entropy_large_logits_stay_finite_and_exact():
    z = np.array([[1000.0, -1000.0, 1000.0, -1000.0, 30.0, -30.0]])
    Y = np.array([[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = 1.0 / (1.0 + np.exp(-z))
        naive = -np.sum(Y * np.log(s) + (1 - Y) * np.log(1 - s))
    assert not np.isfinite(naive)
    delta, value = ref.output_delta(z, Y, "sigmoid", "binary_cross_entropy")
    # softplus(z) - y z per entry: 1000, 1000, 0, 0, 30 + log1p(e^-30), 30 + log1p(e^-30)
    expected = 2000.0 + 2 * (30.0 + np.log1p(np.exp(-30.0)))
    assert np.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-14)
    np.testing.assert_allclose(delta, s - Y, rtol=1e-12, atol=1e-300)
    assert np.all(np.isfinite(delta))


def test_log_losses_of_confident_predictions_are_accurate_to_rounding():
    """Confident, correct predictions: the true loss is tiny (e^-30 ~ 1e-13) and sits next to
    terms of size |z| that cancel, so only absolute accuracy ~eps * sum|z| / B can be asked."""
    z = np.array([[30.0, -30.0, 25.0], [-40.0, 35.0, 30.0]])
    Y = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    _, value = ref.output_delta(z, Y, "sigmoid", "binary_cross_entropy")
    # per entry: y softplus(-z) + (1 - y) softplus(z), no cancellation at all
    true = float(np.sum(Y * np.log1p(np.exp(-z)) + (1 - Y) * np.log1p(np.exp(z))) / 2)
    bound = 4 * np.finfo(np.float64).eps * np.sum(np.abs(z)) / 2
    assert abs(value - true) <= bound
    assert 0 <= value < 1e-10

    zc = np.array([[30.0, 0.0, -5.0], [1.0, 28.0, 2.0]])
    labels = np.array([0, 1])
    _, value = ref.output_delta(zc, labels, "softmax", "cross_entropy")
    others = [np.exp(zc[0, 1:] - 30.0).sum(), np.exp(zc[1, [0, 2]] - 28.0).sum()]
    true = float(np.mean(np.log1p(others)))
    assert abs(value - true) <= 4 * np.finfo(np.float64).eps * np.sum(np.abs(zc)) / 2
    assert 0 <= value < 1e-10


@pytest.mark.parametrize("output", ["identity", "sigmoid", "tanh", "relu", "softmax"])
def test_mse_large_logits_stay_finite(output):
    z = np.array([[1000.0, -1000.0, 3.0], [-1000.0, 1000.0, -3.0]])
    Y = np.array([[0.5, 0.25, 1.0], [0.0, 1.0, 0.75]])
    with np.errstate(over="ignore"):
        delta, value = ref.output_delta(z, Y, output, "mse")
        a = NAIVE_ACTIVATIONS[output](z) if output != "softmax" else None
    if output == "softmax":
        a = np.exp(z - z.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
    assert np.isfinite(value) and np.all(np.isfinite(delta))
    assert value == pytest.approx(np.sum((a - Y) ** 2) / 4, rel=1e-14)


def test_output_delta_rejects_undefined_pairs():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="cross_entropy"):
        ref.output_delta(z, np.array([0, 1]), "sigmoid", "cross_entropy")
    with pytest.raises(ValueError, match="binary_cross_entropy"):
        ref.output_delta(z, np.zeros((2, 3)), "softmax", "binary_cross_entropy")


# --- hidden_delta, parameter_gradients -----------------------------------------------------


@pytest.mark.parametrize("activation", ["identity", "sigmoid", "tanh", "relu", "leaky_relu"])
@pytest.mark.parametrize(("B", "n", "n_next"), [(1, 1, 1), (7, 33, 3), (3, 1, 5)])
def test_hidden_delta_shape_and_values(rng, activation, B, n, n_next):
    delta_next = rng.normal(size=(B, n_next))
    W_next = rng.normal(size=(n_next, n))
    z = rng.normal(0.0, 2.0, (B, n))
    a = NAIVE_ACTIVATIONS[activation](z)
    delta = ref.hidden_delta(delta_next, W_next, a, activation)
    assert delta.shape == (B, n)
    # written with explicit sums, f' from z rather than from a
    expected = np.einsum("bk,kj->bj", delta_next, W_next) * NAIVE_DERIVATIVES[activation](z)
    np.testing.assert_allclose(delta, expected, rtol=1e-12, atol=1e-14)


def test_hidden_delta_rejects_softmax(rng):
    with pytest.raises(ValueError, match="softmax"):
        ref.hidden_delta(np.ones((2, 3)), np.ones((3, 4)), np.full((2, 4), 0.25), "softmax")


@pytest.mark.parametrize(("B", "n_in", "n_out"), [(1, 1, 1), (7, 33, 3), (4, 1, 5)])
def test_parameter_gradients_shapes_and_values(rng, B, n_in, n_out):
    delta = rng.normal(size=(B, n_out))
    a_prev = rng.normal(size=(B, n_in))
    dW, db = ref.parameter_gradients(delta, a_prev)
    assert dW.shape == (n_out, n_in)
    assert db.shape == (n_out,)
    expected_dW = sum(np.outer(delta[k], a_prev[k]) for k in range(B))
    np.testing.assert_allclose(dW, expected_dW, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(db, [sum(delta[k, j] for k in range(B)) for j in range(n_out)])


def test_forward_layer_shape_and_values(rng):
    a_prev = rng.normal(size=(7, 33))
    W = rng.normal(size=(3, 33))
    b = rng.normal(size=3)
    out = ref.forward_layer(a_prev, W, b, "tanh")
    assert out.shape == (7, 3)
    expected = np.tanh(np.einsum("bi,oi->bo", a_prev, W) + b)
    np.testing.assert_allclose(out, expected, rtol=1e-12)


# --- purity: the reference never writes into its arguments -----------------------------------


def _frozen(*arrays: np.ndarray) -> list[np.ndarray]:
    """Float64 copies that refuse writes, so in-place use raises at once."""
    out = []
    for a in arrays:
        c = np.array(a, dtype=np.asarray(a).dtype, copy=True)
        c.flags.writeable = False
        out.append(c)
    return out


def _assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_reference_ops_never_modify_inputs(rng):
    B, sizes = 5, (4, 6, 3)
    W = [rng.normal(size=(sizes[i + 1], sizes[i])) for i in range(2)]
    b = [rng.normal(size=sizes[i + 1]) for i in range(2)]
    x = rng.normal(size=(B, 4))
    labels = rng.integers(0, 3, B)
    Yf = (rng.random((B, 3)) < 0.5).astype(np.float64)
    z = rng.normal(size=(B, 3))
    originals = [*W, *b, x, labels, Yf, z]
    snapshot = [o.copy() for o in originals]
    fW0, fW1, fb0, fb1, fx, flabels, fYf, fz = _frozen(*originals)
    # writeable arrays too, so a write that does not raise is still seen by _assert_same
    for args in ((fW0, fW1, fb0, fb1, fx, flabels, fYf, fz), tuple(originals)):
        W0, W1, b0, b1, xx, lab, Y, zz = args
        a1 = ref.forward_layer(xx, W0, b0, "relu")
        ref.forward_layer(xx, W0, b0, "sigmoid")
        for act in ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax"):
            ref.activate(zz, act)
        for act in ("identity", "sigmoid", "tanh", "relu", "leaky_relu"):
            ref.derivative_from_output(zz, act)
        for output, loss, y in (
            ("softmax", "cross_entropy", lab),
            ("sigmoid", "binary_cross_entropy", Y),
            ("tanh", "mse", Y),
            ("softmax", "mse", Y),
            ("relu", "mse", lab),
        ):
            ref.output_delta(zz, y, output, loss)
        d = ref.hidden_delta(zz, W1, a1, "relu")
        ref.parameter_gradients(d, xx)
        ref.forward([W0, W1], [b0, b1], xx, "tanh", "softmax")
        ref.gradients([W0, W1], [b0, b1], xx, lab, "tanh", "softmax", "cross_entropy")
        ref.sgd_update(W0, W0 * 0.5, W0, 0.1, 0.9, True, 0.01)
        ref.adam_update(W0, W0, W0, np.abs(W0), 3, 0.1, 0.9, 0.999, 1e-8, 0.01, False)
        ref.adam_update(W0, W0, W0, np.abs(W0), 3, 0.1, 0.9, 0.999, 1e-8, 0.01, True)
        _assert_same(snapshot, originals)


def test_update_parameters_and_train_step_are_pure(rng):
    from gpubp.optim import SGD, Adam

    sizes = (3, 4, 2)
    W = [rng.normal(size=(sizes[i + 1], sizes[i])) for i in range(2)]
    b = [rng.normal(size=sizes[i + 1]) for i in range(2)]
    x = rng.normal(size=(5, 3))
    y = rng.integers(0, 2, 5)
    params = _frozen(*W, *b)
    grads = _frozen(*[rng.normal(size=p.shape) for p in params])
    for opt in (SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1), Adam(lr=0.1)):
        state = {"step": 2}
        for slot in opt.slots:
            state[slot] = _frozen(*[rng.normal(size=p.shape) ** 2 for p in params])
        state_before = {k: (v if k == "step" else [s.copy() for s in v]) for k, v in state.items()}
        param_list = list(params)
        params_before = [p.copy() for p in params]
        new_params, new_state = ref.update_parameters(param_list, list(grads), opt, state)
        assert all(p is q for p, q in zip(param_list, params, strict=True))
        _assert_same(params_before, params)
        assert state["step"] == 2 and new_state["step"] == 3
        for slot in opt.slots:
            _assert_same(state_before[slot], state[slot])
            assert all(n is not o for n, o in zip(new_state[slot], state[slot], strict=True))
        assert all(n is not o for n, o in zip(new_params, params, strict=True))
        assert any(not np.array_equal(n, o) for n, o in zip(new_params, params, strict=True))

        fW, fb = _frozen(*W), _frozen(*b)
        value, W2, b2, s2 = ref.train_step(
            fW, fb, _frozen(x)[0], _frozen(y)[0], "tanh", "softmax", "cross_entropy", opt, state
        )
        _assert_same(W, fW)
        _assert_same(b, fb)
        assert np.isfinite(value) and s2["step"] == 3 and state["step"] == 2
        assert [w.shape for w in W2] == [w.shape for w in W]
        assert [v.shape for v in b2] == [v.shape for v in b]
