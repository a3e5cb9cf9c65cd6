"""Tests of the user-facing :class:`gpubp.MLP`: construction, initialisation, inference,
gradients, training, input forms, targets, save/load, fit and parameter access.

Every numerical check is against :mod:`gpubp.reference` (float64, formula by formula).
Tests that are about backends run once per backend that can run here.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys

import numpy as np
import pytest

import gpubp
from gpubp import optim, reference

BACKENDS = gpubp.available_backends()
ALL_BACKEND_NAMES = ("cupy", "numba", "numpy")

# Written out here (not imported from gpubp) so that a name dropped from the library fails a test.
HIDDEN = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")
OUTPUTS = ("identity", "sigmoid", "tanh", "relu", "softmax")
LOSS_OUTPUTS = {
    "mse": OUTPUTS,
    "cross_entropy": ("softmax",),
    "binary_cross_entropy": ("sigmoid",),
}
VALID = [(a, o, loss) for a in HIDDEN for loss, outs in LOSS_OUTPUTS.items() for o in outs]
INVALID = [(o, loss) for loss, outs in LOSS_OUTPUTS.items() for o in OUTPUTS if o not in outs]
# Every combination on every backend is checked against the reference op by op in
# test_backends.py (gpubp.check.check_configuration: forward, loss, dW, db, each optimizer's
# step). What MLP adds per backend is its own plumbing: the input checks, the output activation
# applied after the last layer (forward, predict), the per-batch loss sums and accuracy counts
# (evaluate), the NumPy copies (gradients). These cases cover it: every output once (with every
# hidden activation once) for forward, and one model per loss for evaluate and gradients.
FORWARD_CASES = [(a, o, "mse") for a, o in zip(HIDDEN, OUTPUTS)]
LOSS_CASES = [
    ("relu", "softmax", "cross_entropy"),
    ("tanh", "sigmoid", "binary_cross_entropy"),
    ("leaky_relu", "identity", "mse"),
]

OPTIMIZERS = {
    "sgd": lambda: optim.SGD(lr=0.5),
    "momentum": lambda: optim.SGD(lr=0.1, momentum=0.9),
    "nesterov": lambda: optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "adam": lambda: optim.Adam(lr=0.02),
    "adamw": lambda: optim.AdamW(lr=0.02),
}


# --- helpers --------------------------------------------------------------------------------


def flat(params) -> list:
    """``W^1..W^L, b^1..b^L`` from ``(weights, biases)``."""
    W, b = params
    return [*W, *b]


def make_data(n_in: int, n_out: int, loss: str, batch: int = 7, seed: int = 0):
    """Inputs and targets suited to ``loss`` (labels for cross-entropy, probabilities for BCE)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n_in))
    if loss == "cross_entropy":
        y = rng.integers(0, n_out, batch)
    elif loss == "binary_cross_entropy":
        y = (rng.random((batch, n_out)) > 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((batch, n_out))
    return x, y


def blobs(n_per_class: int = 20, seed: int = 0):
    """Three well separated Gaussian clusters in 2-D: a small learnable problem."""
    rng = np.random.default_rng(seed)
    centres = np.array([[2.0, 0.0], [-2.0, 1.5], [0.0, -2.5]])
    x = np.concatenate([c + 0.5 * rng.standard_normal((n_per_class, 2)) for c in centres])
    y = np.repeat(np.arange(3), n_per_class)
    return x, y


def ref_loss(model: gpubp.MLP, x, y) -> float:
    """The loss by the reference on the model's own parameters."""
    W, b = model.get_parameters()
    value, _, _ = reference.gradients(W, b, x, y, model.activation, model.output, model.loss)
    return value


def assert_params_equal(p, q) -> None:
    (W1, b1), (W2, b2) = p, q
    assert len(W1) == len(W2) and len(b1) == len(b2)
    for a, c in zip(W1 + b1, W2 + b2):
        np.testing.assert_array_equal(a, c)


def params_differ(p, q) -> bool:
    (W1, b1), (W2, b2) = p, q
    return any(not np.array_equal(a, c) for a, c in zip(W1 + b1, W2 + b2))


# --- construction ---------------------------------------------------------------------------


def test_defaults():
    m = gpubp.MLP([4, 8, 3])
    assert m.activation == "relu"
    assert m.output == "softmax"
    assert m.loss == "cross_entropy"
    assert m.dtype == np.float32
    assert m.seed == 0
    assert m.backend.name in BACKENDS
    assert m.layer_sizes == (4, 8, 3)
    assert (m.n_layers, m.n_inputs, m.n_outputs) == (2, 4, 3)
    assert m.n_parameters == 8 * 5 + 3 * 9
    W, b = m.get_parameters()
    assert [w.shape for w in W] == [(8, 4), (3, 8)]
    assert [v.shape for v in b] == [(8,), (3,)]
    assert all(a.dtype == np.float32 for a in W + b)
    assert all(not v.any() for v in b), "biases start at zero"
    assert m.config() == {
        "layer_sizes": [4, 8, 3],
        "activation": "relu",
        "output": "softmax",
        "loss": "cross_entropy",
        "dtype": "float32",
        "seed": 0,
    }
    assert "MLP(" in repr(m)


@pytest.mark.parametrize(("activation", "output", "loss"), VALID)
def test_every_valid_combination_builds_and_runs(activation, output, loss):
    """On NumPy; every backend runs every combination in test_backends.py."""
    m = gpubp.MLP([3, 5, 4, 2], activation=activation, output=output, loss=loss, backend="numpy")
    assert (m.activation, m.output, m.loss) == (activation, output, loss)
    assert m.backend.name == "numpy"
    x, y = make_data(3, 2, loss)
    out = m.forward(x)
    assert out.shape == (7, 2)
    assert np.isfinite(out).all()
    value = m.train_step(x, y, optim.SGD(lr=0.01))
    assert isinstance(value, float) and np.isfinite(value)


@pytest.mark.parametrize(("output", "loss"), INVALID)
def test_invalid_output_loss_combination_is_refused_naming_both(output, loss):
    with pytest.raises(ValueError) as info:
        gpubp.MLP([3, 4, 2], output=output, loss=loss)
    msg = str(info.value)
    assert loss in msg and output in msg
    assert "loss" in msg and "output" in msg


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"activation": "gelu"}, "activation"),
        ({"activation": "softmax"}, "activation"),  # output layer only
        ({"activation": None}, "activation"),
        ({"activation": "ReLU"}, "activation"),
        ({"output": "leaky_relu"}, "output"),
        ({"output": "swish"}, "output"),
        ({"loss": "hinge"}, "loss"),
        ({"loss": None}, "loss"),
        ({"backend": "tensorflow"}, "backend"),
        ({"backend": 3}, "backend"),
        ({"dtype": "float16"}, "dtype"),
        ({"dtype": "int32"}, "dtype"),
        ({"dtype": "banana"}, "dtype"),
        ({"dtype": np.complex128}, "dtype"),
    ],
)
def test_unknown_names_are_refused(kwargs, argument):
    with pytest.raises(ValueError) as info:
        gpubp.MLP([3, 4, 2], **kwargs)
    msg = str(info.value)
    assert argument in msg
    assert "expected" in msg, f"the message should say what is supported: {msg}"


def test_unavailable_backend_says_why():
    missing = [n for n in ALL_BACKEND_NAMES if n not in BACKENDS]
    if not missing:
        pytest.skip("needs a backend that cannot run here, and every backend runs here")
    for name in missing:
        with pytest.raises(gpubp.BackendUnavailableError) as info:
            gpubp.MLP([3, 4, 2], backend=name)
        assert name in str(info.value)
        assert "auto" in str(info.value), "the message should offer an alternative"


@pytest.mark.parametrize("dtype", ["float32", "float64", np.float32, np.dtype("float64")])
def test_dtype_spellings(dtype):
    m = gpubp.MLP([3, 4, 2], dtype=dtype)
    assert m.dtype == np.dtype(dtype)
    assert all(a.dtype == np.dtype(dtype) for a in flat(m.get_parameters()))


@pytest.mark.parametrize(
    "sizes",
    [[], [5], (5,), [3, 0, 2], [3, -1, 2], [3, 2.5, 2], [3, True, 2], [3, "4", 2], [3, None]],
)
def test_bad_layer_sizes(sizes):
    with pytest.raises((ValueError, TypeError)) as info:
        gpubp.MLP(sizes)
    assert "layer_sizes" in str(info.value)


@pytest.mark.parametrize("sizes", ["34", 5, None, {3: 1, 4: 2}])
def test_layer_sizes_not_a_sequence(sizes):
    with pytest.raises((ValueError, TypeError)) as info:
        gpubp.MLP(sizes)
    assert "layer_sizes" in str(info.value)


def test_layer_sizes_accepts_tuples_and_numpy_ints():
    m = gpubp.MLP((np.int64(3), np.int32(4), 2))
    assert m.layer_sizes == (3, 4, 2)
    assert all(type(n) is int for n in m.layer_sizes)


@pytest.mark.parametrize("seed", [1.5, "0", True])
def test_bad_seed(seed):
    with pytest.raises(TypeError, match="seed"):
        gpubp.MLP([3, 4, 2], seed=seed)


# --- initialisation -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_parameters(dtype):
    a = gpubp.MLP([5, 7, 3], seed=123, dtype=dtype)
    b = gpubp.MLP([5, 7, 3], seed=123, dtype=dtype)
    assert_params_equal(a.get_parameters(), b.get_parameters())


def test_different_seed_different_parameters():
    a = gpubp.MLP([5, 7, 3], seed=1)
    b = gpubp.MLP([5, 7, 3], seed=2)
    assert params_differ(a.get_parameters(), b.get_parameters())


def test_seed_none_is_random():
    a = gpubp.MLP([5, 7, 3], seed=None)
    b = gpubp.MLP([5, 7, 3], seed=None)
    assert params_differ(a.get_parameters(), b.get_parameters())


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_he_initialisation_statistics(activation):
    n_in = 400
    m = gpubp.MLP([n_in, 600, 10], activation=activation, dtype="float64", seed=3)
    W = m.get_parameters()[0][0]
    expected = np.sqrt(2.0 / n_in)
    assert abs(W.std() - expected) < 0.1 * expected
    assert abs(W.mean()) < 0.05 * expected
    # normal, not uniform: some weights beyond 2 standard deviations
    assert (np.abs(W) > 2 * expected).mean() > 0.02


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "identity"])
def test_glorot_initialisation_statistics(activation):
    n_in, n_out = 400, 600
    m = gpubp.MLP([n_in, n_out, 10], activation=activation, dtype="float64", seed=4)
    W = m.get_parameters()[0][0]
    limit = np.sqrt(6.0 / (n_in + n_out))
    assert np.abs(W).max() <= limit
    assert np.abs(W).max() > 0.95 * limit
    expected_std = limit / np.sqrt(3.0)
    assert abs(W.std() - expected_std) < 0.1 * expected_std
    assert abs(W.mean()) < 0.05 * expected_std


def test_softmax_output_layer_uses_glorot():
    n_in, n_out = 300, 50
    m = gpubp.MLP([10, n_in, n_out], activation="relu", dtype="float64", seed=5)
    W = m.get_parameters()[0][1]
    limit = np.sqrt(6.0 / (n_in + n_out))
    assert np.abs(W).max() <= limit
    assert abs(W.std() - limit / np.sqrt(3.0)) < 0.1 * limit / np.sqrt(3.0)


# --- forward / predict / evaluate -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("activation", "output", "loss"), FORWARD_CASES)
def test_forward_float64_matches_reference(activation, output, loss, backend):
    m = gpubp.MLP([3, 6, 5, 4], activation, output, loss, backend=backend, dtype="float64", seed=7)
    x, _ = make_data(3, 4, loss, batch=9)
    out = m.forward(x)
    W, b = m.get_parameters()
    ref = reference.forward(W, b, x, activation, output)
    assert out.dtype == np.float64 and out.shape == (9, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14 * np.abs(ref).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", HIDDEN)
def test_forward_float32_close_to_reference(activation, backend):
    m = gpubp.MLP([6, 16, 16, 5], activation=activation, backend=backend, seed=1)
    x, _ = make_data(6, 5, "cross_entropy", batch=11)
    out = m.forward(x)
    assert out.dtype == np.float32
    W, b = m.get_parameters()
    ref = reference.forward(W, b, x.astype(np.float32), activation, "softmax")
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_in_chunks_equals_whole_batch(backend):
    m = gpubp.MLP([4, 8, 3], backend=backend, dtype="float64", seed=2)
    x, _ = make_data(4, 3, "mse", batch=10)
    whole = m.forward(x)
    np.testing.assert_allclose(m.forward(x, batch_size=3), whole, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m.forward(x, batch_size=1), whole, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predict_classifier(backend):
    m = gpubp.MLP([4, 8, 3], backend=backend, seed=2)
    x, _ = make_data(4, 3, "cross_entropy", batch=10)
    p = m.predict(x)
    assert p.shape == (10,)
    assert p.dtype.kind in "iu"
    np.testing.assert_array_equal(p, np.argmax(m.forward(x), axis=1))


def test_predict_bce_single_output_gives_labels():
    m = gpubp.MLP([4, 8, 1], output="sigmoid", loss="binary_cross_entropy", seed=2)
    x, _ = make_data(4, 1, "mse", batch=10)
    p = m.predict(x)
    assert p.shape == (10,)
    np.testing.assert_array_equal(p, (m.forward(x)[:, 0] > 0.5).astype(int))
    assert set(np.unique(p)) <= {0, 1}


def test_predict_bce_several_outputs_gives_label_per_output():
    m = gpubp.MLP([4, 8, 3], output="sigmoid", loss="binary_cross_entropy", seed=2)
    x, _ = make_data(4, 3, "mse", batch=10)
    p = m.predict(x)
    assert p.shape == (10, 3)
    np.testing.assert_array_equal(p, (m.forward(x) > 0.5).astype(int))


def test_predict_single_output_regression_gives_outputs():
    m = gpubp.MLP([4, 8, 1], output="identity", loss="mse", seed=2)
    x, _ = make_data(4, 1, "mse", batch=10)
    p = m.predict(x)
    assert p.shape == (10, 1)
    np.testing.assert_array_equal(p, m.forward(x))


@pytest.mark.parametrize("n_out", [2, 3])
def test_predict_multi_output_mse_gives_argmax(n_out):
    """Two outputs count as several: labels, not outputs (the smallest classifier)."""
    m = gpubp.MLP([4, 8, n_out], output="identity", loss="mse", seed=2)
    x, _ = make_data(4, n_out, "mse", batch=10)
    p = m.predict(x)
    assert p.shape == (10,)
    np.testing.assert_array_equal(p, np.argmax(m.forward(x), axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("activation", "output", "loss"), LOSS_CASES)
def test_evaluate_loss_matches_reference(activation, output, loss, backend):
    m = gpubp.MLP([3, 6, 4], activation, output, loss, backend=backend, dtype="float64", seed=8)
    x, y = make_data(3, 4, loss, batch=10)
    result = m.evaluate(x, y)
    expected = ref_loss(m, x, y)
    assert result["loss"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    chunked = m.evaluate(x, y, batch_size=3)
    assert chunked["loss"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert chunked["accuracy"] == result["accuracy"]


def test_evaluate_accuracy_classifier():
    m = gpubp.MLP([3, 6, 4], dtype="float64", seed=8)
    x, y = make_data(3, 4, "cross_entropy", batch=20)
    acc = m.evaluate(x, y)["accuracy"]
    assert acc == pytest.approx(np.mean(m.predict(x) == y))
    # labels set to the predictions: every one right
    assert m.evaluate(x, m.predict(x))["accuracy"] == 1.0


def test_evaluate_accuracy_bce():
    m = gpubp.MLP([3, 6, 2], output="sigmoid", loss="binary_cross_entropy", seed=8)
    x, y = make_data(3, 2, "binary_cross_entropy", batch=20)
    acc = m.evaluate(x, y)["accuracy"]
    assert acc == pytest.approx(np.mean(m.predict(x) == y))


@pytest.mark.parametrize("n_out", [2, 3])
def test_evaluate_accuracy_multi_output_mse(n_out):
    m = gpubp.MLP([3, 6, n_out], output="identity", loss="mse", dtype="float64", seed=8)
    x, y = make_data(3, n_out, "cross_entropy", batch=20)  # integer labels
    acc = m.evaluate(x, y)["accuracy"]
    assert acc is not None
    assert acc == pytest.approx(np.mean(m.predict(x) == y))
    assert m.evaluate(x, m.predict(x))["accuracy"] == 1.0


def test_evaluate_single_output_regression_has_no_accuracy():
    m = gpubp.MLP([3, 6, 1], output="identity", loss="mse", seed=8)
    x, y = make_data(3, 1, "mse")
    assert m.evaluate(x, y)["accuracy"] is None


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("activation", "output", "loss"), LOSS_CASES)
def test_gradients_match_reference(activation, output, loss, backend):
    m = gpubp.MLP([3, 6, 5, 4], activation, output, loss, backend=backend, dtype="float64", seed=9)
    x, y = make_data(3, 4, loss, batch=8)
    before = m.get_parameters()
    value, dWs, dbs = m.gradients(x, y)
    W, b = before
    ref_value, ref_dW, ref_db = reference.gradients(W, b, x, y, activation, output, loss)
    assert value == pytest.approx(ref_value, rel=1e-12, abs=1e-15)
    assert len(dWs) == len(dbs) == 3
    for got, want in zip(dWs + dbs, ref_dW + ref_db):
        assert got.shape == want.shape
        scale = max(np.abs(want).max(), 1e-300)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * scale)
    assert_params_equal(m.get_parameters(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_float32_close_to_reference(backend):
    m = gpubp.MLP([5, 16, 4], backend=backend, seed=1)
    x, y = make_data(5, 4, "cross_entropy", batch=12)
    value, dWs, dbs = m.gradients(x, y)
    W, b = m.get_parameters()
    rv, rW, rb = reference.gradients(
        W, b, x.astype(np.float32), y, "relu", "softmax", "cross_entropy"
    )
    assert value == pytest.approx(rv, rel=1e-5)
    for got, want in zip(dWs + dbs, rW + rb):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gradients_are_copies():
    m = gpubp.MLP([4, 8, 3], dtype="float64", seed=1)
    x1, y1 = make_data(4, 3, "cross_entropy", batch=6, seed=1)
    x2, y2 = make_data(4, 3, "cross_entropy", batch=6, seed=2)
    _, dW1, db1 = m.gradients(x1, y1)
    saved = [a.copy() for a in dW1 + db1]
    m.gradients(x2, y2)  # same batch shape: reuses any internal buffers
    m.train_step(x2, y2, optim.SGD(lr=0.1))
    for a, c in zip(dW1 + db1, saved):
        np.testing.assert_array_equal(a, c)


# --- train_step -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_train_step_learns_blobs(name, backend):
    # 40 steps: four times what the slowest optimizer here (Adam) needs to pass
    x, y = blobs()
    m = gpubp.MLP([2, 16, 3], backend=backend, dtype="float64", seed=0)
    opt = OPTIMIZERS[name]()
    first = m.evaluate(x, y)["loss"]
    losses = [m.train_step(x, y, opt) for _ in range(40)]
    assert losses[0] == pytest.approx(first, rel=1e-12)
    final = m.evaluate(x, y)
    assert final["loss"] < 0.25 * first
    assert final["accuracy"] >= 0.95
    assert opt.state_dict()["step"] == 40


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_train_step_learns_xor_with_bce(name):
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.float32)
    m = gpubp.MLP([2, 8, 1], activation="tanh", output="sigmoid", loss="binary_cross_entropy")
    opt = optim.SGD(lr=0.5, momentum=0.9) if name == "momentum" else optim.Adam(lr=0.05)
    first = m.evaluate(x, y)["loss"]
    for _ in range(150):  # four times what Adam needs here (momentum: 21 steps)
        m.train_step(x, y, opt)
    assert m.evaluate(x, y)["loss"] < 0.25 * first
    np.testing.assert_array_equal(m.predict(x), y.astype(int))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_train_step_matches_reference(name, backend):
    m = gpubp.MLP([3, 6, 4], "tanh", "softmax", backend=backend, dtype="float64", seed=3)
    x, y = make_data(3, 4, "cross_entropy", batch=8)
    opt, ref_opt = OPTIMIZERS[name](), OPTIMIZERS[name]()
    W, b = m.get_parameters()
    state = {"step": 0}
    for slot in ref_opt.slots:
        state[slot] = [np.zeros_like(p) for p in W + b]
    for _ in range(3):
        value = m.train_step(x, y, opt)
        ref_value, W, b, state = reference.train_step(
            W, b, x, y, "tanh", "softmax", "cross_entropy", ref_opt, state
        )
        assert value == pytest.approx(ref_value, rel=1e-12)
    gW, gb = m.get_parameters()
    for got, want in zip(gW + gb, W + b):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


# --- input forms ----------------------------------------------------------------------------


def test_inputs_as_lists():
    m = gpubp.MLP([3, 5, 2], dtype="float64", seed=1)
    x, y = make_data(3, 2, "cross_entropy", batch=4)
    np.testing.assert_array_equal(m.forward(x.tolist()), m.forward(x))
    np.testing.assert_array_equal(m.predict(x.tolist()), m.predict(x))
    g_list = m.gradients(x.tolist(), y.tolist())
    g_arr = m.gradients(x, y)
    assert g_list[0] == g_arr[0]
    for a, c in zip(g_list[1] + g_list[2], g_arr[1] + g_arr[2]):
        np.testing.assert_array_equal(a, c)
    assert np.isfinite(m.train_step(x.tolist(), y.tolist(), optim.SGD(lr=0.1)))


def test_float64_input_to_float32_model():
    m = gpubp.MLP([3, 5, 2], seed=1)
    x, y = make_data(3, 2, "cross_entropy", batch=4)
    out = m.forward(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, m.forward(x.astype(np.float32)))
    a = m.gradients(x, y)
    c = m.gradients(x.astype(np.float32), y)
    assert a[0] == c[0]
    assert all(g.dtype == np.float32 for g in a[1] + a[2])


@pytest.mark.parametrize("int_dtype", [np.int8, np.int32, np.int64, np.uint8])
def test_integer_inputs(int_dtype):
    m = gpubp.MLP([3, 5, 2], dtype="float64", seed=1)
    x = np.array([[1, 2, 3], [0, 1, 0], [4, 0, 2]], dtype=int_dtype)
    np.testing.assert_array_equal(m.forward(x), m.forward(x.astype(np.float64)))
    assert np.isfinite(m.train_step(x, [0, 1, 1], optim.SGD(lr=0.1)))


def test_bool_inputs():
    m = gpubp.MLP([3, 5, 2], dtype="float64", seed=1)
    x = np.array([[True, False, True], [False, False, True]])
    np.testing.assert_array_equal(m.forward(x), m.forward(x.astype(np.float64)))


def test_non_contiguous_inputs():
    m = gpubp.MLP([3, 5, 2], dtype="float64", seed=1)
    x, y = make_data(3, 2, "cross_entropy", batch=6)
    expected = m.forward(x)
    np.testing.assert_array_equal(m.forward(np.asfortranarray(x)), expected)
    wide = np.zeros((6, 6))
    wide[:, ::2] = x
    np.testing.assert_array_equal(m.forward(wide[:, ::2]), expected)
    a = m.gradients(np.asfortranarray(x), y)
    c = m.gradients(x, y)
    for g, h in zip(a[1] + a[2], c[1] + c[2]):
        np.testing.assert_array_equal(g, h)


# --- targets --------------------------------------------------------------------------------


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_integer_labels_equal_one_hot_for_cross_entropy(label_dtype):
    m = gpubp.MLP([4, 6, 3], dtype="float64", seed=2)
    x, y = make_data(4, 3, "cross_entropy", batch=9)
    labels = y.astype(label_dtype)
    onehot = np.eye(3)[y]
    v1, dW1, db1 = m.gradients(x, labels)
    v2, dW2, db2 = m.gradients(x, onehot)
    assert v1 == pytest.approx(v2, rel=1e-14)
    for a, c in zip(dW1 + db1, dW2 + db2):
        np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-16)
    e1, e2 = m.evaluate(x, labels), m.evaluate(x, onehot)
    assert e1["loss"] == pytest.approx(e2["loss"], rel=1e-14)
    assert e1["accuracy"] == e2["accuracy"]
    # and one training step from each leads to the same parameters
    m2 = gpubp.MLP([4, 6, 3], dtype="float64", seed=2)
    m.train_step(x, labels, optim.SGD(lr=0.1))
    m2.train_step(x, onehot, optim.SGD(lr=0.1))
    for a, c in zip(flat(m.get_parameters()), flat(m2.get_parameters())):
        np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("output", ["identity", "sigmoid", "softmax"])
def test_mse_with_integer_labels_when_several_outputs(output):
    m = gpubp.MLP([4, 6, 3], output=output, loss="mse", dtype="float64", seed=2)
    x, y = make_data(4, 3, "cross_entropy", batch=9)
    onehot = np.eye(3)[y]
    v1, dW1, db1 = m.gradients(x, y)
    v2, dW2, db2 = m.gradients(x, onehot)
    assert v1 == pytest.approx(v2, rel=1e-14)
    W, b = m.get_parameters()
    rv, rW, rb = reference.gradients(W, b, x, onehot, "relu", output, "mse")
    assert v1 == pytest.approx(rv, rel=1e-12)
    for a, c, r in zip(dW1 + db1, dW2 + db2, rW + rb):
        np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-16)
        np.testing.assert_allclose(a, r, rtol=1e-10, atol=1e-14)
    e = m.evaluate(x, y)
    assert e["loss"] == pytest.approx(rv, rel=1e-12)
    assert e["accuracy"] == pytest.approx(np.mean(m.predict(x) == y))


def test_bce_with_1d_targets_when_one_output():
    m = gpubp.MLP([4, 6, 1], output="sigmoid", loss="binary_cross_entropy", dtype="float64")
    x, y = make_data(4, 1, "binary_cross_entropy", batch=9)
    flat = y[:, 0]
    for targets in (flat, flat.astype(np.int64), flat.tolist()):
        v1, dW1, db1 = m.gradients(x, targets)
        v2, dW2, db2 = m.gradients(x, y)
        assert v1 == pytest.approx(v2, rel=1e-14)
        for a, c in zip(dW1 + db1, dW2 + db2):
            np.testing.assert_allclose(a, c, rtol=1e-13, atol=1e-16)
        assert m.evaluate(x, targets) == m.evaluate(x, y)


def test_bce_accepts_soft_targets():
    m = gpubp.MLP([4, 6, 2], output="sigmoid", loss="binary_cross_entropy", dtype="float64")
    x, _ = make_data(4, 2, "mse", batch=5)
    y = np.random.default_rng(0).random((5, 2))
    W, b = m.get_parameters()
    rv, _, _ = reference.gradients(W, b, x, y, "relu", "sigmoid", "binary_cross_entropy")
    assert m.gradients(x, y)[0] == pytest.approx(rv, rel=1e-12)


def test_mse_single_output_with_1d_targets():
    m = gpubp.MLP([4, 6, 1], output="identity", loss="mse", dtype="float64")
    x, y = make_data(4, 1, "mse", batch=9)
    v1, dW1, _ = m.gradients(x, y[:, 0])
    v2, dW2, _ = m.gradients(x, y)
    assert v1 == pytest.approx(v2, rel=1e-14)
    np.testing.assert_allclose(dW1[0], dW2[0], rtol=1e-13)


# --- save / load ----------------------------------------------------------------------------


def trained_model(dtype="float32", **kwargs):
    x, y = blobs(5)
    m = gpubp.MLP([2, 7, 3], dtype=dtype, seed=11, **kwargs)
    opt = optim.Adam(lr=0.01)
    for _ in range(3):
        m.train_step(x, y, opt)
    return m, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip(tmp_path, dtype, backend):
    m, x = trained_model(dtype, activation="tanh", backend=backend)
    path = tmp_path / "model.npz"
    m.save(path)
    loaded = gpubp.MLP.load(path, backend=backend)
    assert loaded.config() == m.config()
    assert loaded.dtype == m.dtype
    assert loaded.backend.name == backend
    assert_params_equal(loaded.get_parameters(), m.get_parameters())
    np.testing.assert_array_equal(loaded.forward(x), m.forward(x))
    np.testing.assert_array_equal(loaded.predict(x), m.predict(x))


def test_save_accepts_str_path_without_suffix_and_leaves_no_temp_files(tmp_path):
    m, x = trained_model()
    path = os.path.join(tmp_path, "weights.bin")
    m.save(path)
    assert os.listdir(tmp_path) == ["weights.bin"]
    np.testing.assert_array_equal(gpubp.MLP.load(path).forward(x), m.forward(x))
    m.save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_saved_file_loads_without_pickle(tmp_path):
    m, _ = trained_model()
    path = tmp_path / "m.npz"
    m.save(path)
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        arrays = {k: data[k] for k in data.files}
    assert {"W0", "W1", "b0", "b1", "meta"} <= names
    assert all(a.dtype != object for a in arrays.values())
    meta = json.loads(arrays["meta"].tobytes().decode())
    assert meta["config"] == m.config()


# The canary: unpickling it calls _tripwire, which records the call.
_TRIPPED: list[str] = []


def _tripwire(*args):
    _TRIPPED.append("unpickled")
    return "payload"


class _Canary:
    def __reduce__(self):
        return (_tripwire, ("boom",))


def saved_arrays(tmp_path, dtype="float32"):
    """The arrays of a valid saved model, as a dict to tamper with."""
    m, _ = trained_model(dtype)
    path = tmp_path / "good.npz"
    m.save(path)
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def meta_array(meta) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def assert_load_fails(path, *words):
    with pytest.raises(gpubp.ModelFileError) as info:
        gpubp.MLP.load(path)
    msg = str(info.value)
    assert os.path.basename(str(path)) in msg, f"the message should name the file: {msg}"
    for word in words:
        assert re.search(word, msg, re.IGNORECASE), f"{word!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("where", ["W0", "meta"])
def test_pickled_object_array_is_rejected_unopened(tmp_path, where):
    arrays = saved_arrays(tmp_path)
    arrays[where] = np.array([_Canary(), 1], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    _TRIPPED.clear()
    assert_load_fails(path)
    assert _TRIPPED == [], "loading a model file must never unpickle"


def test_pickled_object_npy_is_rejected(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([_Canary()], dtype=object), allow_pickle=True)
    _TRIPPED.clear()
    assert_load_fails(path)
    assert _TRIPPED == []


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -20])
def test_truncated_file(tmp_path, keep):
    good = tmp_path / "good.npz"
    trained_model()[0].save(good)
    data = good.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "truncated.npz"
    path.write_bytes(data[:n])
    assert_load_fails(path, "gpubp|model|npz|file")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_load_fails(path, "gpubp|model|npz|file")


def test_plain_npy(tmp_path):
    path = tmp_path / "plain.npy"
    np.save(path, np.ones((3, 3)))
    assert_load_fails(path, "npz")


def test_missing_file(tmp_path):
    assert_load_fails(tmp_path / "nope.npz", "no such file")


def test_directory_instead_of_file(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    assert_load_fails(d)


@pytest.mark.parametrize("missing", ["W1", "b0"])
def test_npz_missing_parameter_array(tmp_path, missing):
    arrays = saved_arrays(tmp_path)
    del arrays[missing]
    path = tmp_path / "missing.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, missing)


def test_npz_missing_metadata(tmp_path):
    arrays = saved_arrays(tmp_path)
    del arrays["meta"]
    path = tmp_path / "nometa.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, "metadata")


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("W0", lambda a: a.T),
        ("W1", lambda a: a[:, :-1]),
        ("b1", lambda a: np.append(a, 0.0)),
        ("b0", lambda a: a[None, :]),
    ],
)
def test_npz_wrong_shapes(tmp_path, name, bad):
    arrays = saved_arrays(tmp_path)
    arrays[name] = bad(arrays[name])
    path = tmp_path / "shapes.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, re.escape(name), "shape")


@pytest.mark.parametrize(
    "bad",
    [
        lambda a: np.full_like(a, np.nan),
        lambda a: np.array(["x"] * a.size).reshape(a.shape),
        lambda a: a.astype(np.complex128),
    ],
)
def test_npz_bad_parameter_values(tmp_path, bad):
    arrays = saved_arrays(tmp_path)
    arrays["W1"] = bad(arrays["W1"])
    path = tmp_path / "values.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, "W|weights")


def _good_meta(tmp_path):
    arrays = saved_arrays(tmp_path)
    return arrays, json.loads(arrays["meta"].tobytes().decode())


@pytest.mark.parametrize(
    ("raw", "word"),
    [
        (np.frombuffer(b"{not json", dtype=np.uint8), "JSON"),
        (np.frombuffer(b"\xff\xfe\x00garbage", dtype=np.uint8), "JSON"),
        (np.frombuffer(b"", dtype=np.uint8), "JSON"),
        (meta_array([1, 2, 3]), "gpubp-mlp|format"),
        (np.arange(10, dtype=np.float64), "metadata"),
        (np.zeros((2, 2), dtype=np.uint8), "metadata"),
    ],
)
def test_bad_json_metadata(tmp_path, raw, word):
    arrays = saved_arrays(tmp_path)
    arrays["meta"] = raw
    path = tmp_path / "badmeta.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, word)


@pytest.mark.parametrize(
    ("change", "word"),
    [
        (lambda m: m.update(format="something-else"), "gpubp-mlp|format"),
        (lambda m: m.update(version=99), "version"),
        (lambda m: m.pop("version"), "version"),
        (lambda m: m.pop("config"), "config"),
        (lambda m: m.update(config=[1, 2]), "config"),
        (lambda m: m["config"].update(activation="gelu"), "activation"),
        (lambda m: m["config"].update(loss="cross_entropy", output="sigmoid"), "loss"),
        (lambda m: m["config"].update(layer_sizes=[2, 8, 3]), "shape"),
        (lambda m: m["config"].update(layer_sizes="abc"), "layer_sizes"),
        (lambda m: m["config"].update(dtype="float16"), "dtype"),
        (lambda m: m["config"].update(surprise=1), "config|surprise"),
        (lambda m: m["config"].update(seed=1.5), "seed"),
    ],
)
def test_bad_metadata_content(tmp_path, change, word):
    arrays, meta = _good_meta(tmp_path)
    change(meta)
    arrays["meta"] = meta_array(meta)
    path = tmp_path / "badcontent.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, word)


def test_npz_with_parameter_arrays_the_metadata_does_not_describe(tmp_path):
    """Metadata saying one layer over a file holding two must not load a truncated network."""
    arrays, meta = _good_meta(tmp_path)
    meta["config"]["layer_sizes"] = [2, 7]  # W0 (7, 2) and b0 (7,) still fit; W1, b1 are extra
    arrays["meta"] = meta_array(meta)
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays)
    assert_load_fails(path, "W1|b1|unexpected|extra")


def test_model_file_error_is_a_value_error():
    assert issubclass(gpubp.ModelFileError, ValueError)


# --- fit ------------------------------------------------------------------------------------


def test_fit_history(capsys):
    x, y = blobs(15)
    xv, yv = blobs(5, seed=1)
    m = gpubp.MLP([2, 12, 3], seed=0)
    h = m.fit(
        x,
        y,
        epochs=4,
        batch_size=16,
        optimizer=optim.Adam(lr=0.02),
        validation_data=(xv, yv),
        progress=False,
    )
    assert len(h["loss"]) == 4
    assert len(h["time"]) == 4
    assert len(h["val_loss"]) == 4
    assert len(h["val_accuracy"]) == 4
    assert all(np.isfinite(h["loss"])) and all(t >= 0 for t in h["time"])
    assert h["loss"][-1] < h["loss"][0]
    assert all(0.0 <= a <= 1.0 for a in h["val_accuracy"])
    final = m.evaluate(xv, yv)
    assert h["val_loss"][-1] == pytest.approx(final["loss"], rel=1e-6)
    assert h["val_accuracy"][-1] == pytest.approx(final["accuracy"])
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_fit_without_validation_has_no_val_keys():
    x, y = blobs(5)
    h = gpubp.MLP([2, 4, 3]).fit(x, y, epochs=2, progress=False)
    assert set(h) == {"loss", "time"}
    assert len(h["loss"]) == 2


def test_fit_epoch_loss_is_mean_of_batch_losses():
    x, y = blobs(5)  # 15 samples, batches of 4, 4, 4, 3
    m = gpubp.MLP([2, 4, 3], dtype="float64", seed=0)
    twin = gpubp.MLP([2, 4, 3], dtype="float64", seed=0)
    h = m.fit(
        x, y, epochs=1, batch_size=4, optimizer=optim.SGD(lr=0.1), shuffle=False, progress=False
    )
    opt = optim.SGD(lr=0.1)
    total = sum(
        twin.train_step(x[i : i + 4], y[i : i + 4], opt) * len(y[i : i + 4])
        for i in range(0, 15, 4)
    )
    assert h["loss"][0] == pytest.approx(total / 15, rel=1e-12)
    assert_params_equal(m.get_parameters(), twin.get_parameters())


def test_fit_progress_off_a_terminal_is_epoch_lines_on_stdout(capsys):
    """Not a terminal (a log file, a pipe): one plain line per epoch on stdout, no bar."""
    x, y = blobs(5)
    xv, yv = blobs(3, seed=1)
    gpubp.MLP([2, 4, 3]).fit(x, y, epochs=2, batch_size=4, validation_data=(xv, yv), progress=True)
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss" in line and "val" in line for line in lines)
    assert "\r" not in captured.out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fit_progress_on_a_terminal_adds_a_live_bar(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    x, y = blobs(5)
    gpubp.MLP([2, 4, 3]).fit(x, y, epochs=2, batch_size=4, progress=True)
    assert "\r" in terminal.getvalue() and "[" in terminal.getvalue()  # the bar, redrawn
    assert "epoch 2/2: loss" in capsys.readouterr().out  # the epoch lines stay on stdout


def test_fit_progress_false_writes_nothing(capsys):
    x, y = blobs(5)
    gpubp.MLP([2, 4, 3]).fit(x, y, epochs=2, batch_size=4, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_fit_is_reproducible(name):
    x, y = blobs(10)
    runs = []
    for _ in range(2):
        m = gpubp.MLP([2, 8, 3], seed=42)
        h = m.fit(x, y, epochs=3, batch_size=7, optimizer=OPTIMIZERS[name](), progress=False)
        runs.append((h["loss"], m.get_parameters()))
    assert runs[0][0] == runs[1][0]
    assert_params_equal(runs[0][1], runs[1][1])
    other = gpubp.MLP([2, 8, 3], seed=43)
    h = other.fit(x, y, epochs=3, batch_size=7, optimizer=OPTIMIZERS[name](), progress=False)
    assert h["loss"] != runs[0][0]


def test_fit_shuffles_between_epochs():
    """With shuffling, the batches differ from the unshuffled order (same init)."""
    x, y = blobs(10)
    a = gpubp.MLP([2, 8, 3], dtype="float64", seed=1)
    b = gpubp.MLP([2, 8, 3], dtype="float64", seed=1)
    a.fit(x, y, epochs=1, batch_size=5, optimizer=optim.SGD(lr=0.1), progress=False)
    b.fit(x, y, epochs=1, batch_size=5, optimizer=optim.SGD(lr=0.1), shuffle=False, progress=False)
    assert params_differ(a.get_parameters(), b.get_parameters())


def test_fit_mse_regression_history_has_no_val_accuracy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 3))
    y = x @ np.array([1.0, -2.0, 0.5])
    m = gpubp.MLP([3, 8, 1], output="identity", loss="mse")
    h = m.fit(x, y, epochs=2, validation_data=(x, y), progress=False)
    assert len(h["val_loss"]) == 2
    assert "val_accuracy" not in h


# --- get_parameters / set_parameters --------------------------------------------------------


def test_get_parameters_returns_copies():
    m = gpubp.MLP([3, 5, 2], seed=1)
    x, _ = make_data(3, 2, "mse")
    before_out = m.forward(x)
    W, b = m.get_parameters()
    saved = ([w.copy() for w in W], [v.copy() for v in b])
    for a in W + b:
        a += 100.0
    W.append(np.zeros(3))
    assert_params_equal(m.get_parameters(), saved)
    np.testing.assert_array_equal(m.forward(x), before_out)


def test_set_parameters_round_trip_and_copies_input():
    m = gpubp.MLP([3, 5, 2], dtype="float64", seed=1)
    rng = np.random.default_rng(5)
    W = [rng.standard_normal((5, 3)), rng.standard_normal((2, 5))]
    b = [rng.standard_normal(5), rng.standard_normal(2)]
    m.set_parameters(W, b)
    assert_params_equal(m.get_parameters(), (W, b))
    x, _ = make_data(3, 2, "mse")
    out = m.forward(x)
    np.testing.assert_allclose(out, reference.forward(W, b, x, "relu", "softmax"), rtol=1e-12)
    for a in W + b:
        a *= 3.0
    np.testing.assert_array_equal(m.forward(x), out)


def test_set_parameters_converts_to_model_dtype():
    m = gpubp.MLP([3, 5, 2], seed=1)
    W = [np.ones((5, 3)), [[1] * 5, [2] * 5]]
    b = [np.zeros(5, dtype=np.int64), [0.5, 0.25]]
    m.set_parameters(W, b)
    gW, gb = m.get_parameters()
    assert all(a.dtype == np.float32 for a in gW + gb)
    np.testing.assert_array_equal(gW[1], np.array([[1] * 5, [2] * 5], dtype=np.float32))


def _bad_parameter_cases():
    W = [np.ones((5, 3)), np.ones((2, 5))]
    b = [np.zeros(5), np.zeros(2)]

    def with_(i, kind, value):
        W2, b2 = [a.copy() for a in W], [a.copy() for a in b]
        (W2 if kind == "W" else b2)[i] = value
        return W2, b2

    nan_b = np.zeros(2)
    nan_b[1] = np.nan
    inf_w = np.ones((2, 5))
    inf_w[0, 0] = -np.inf
    return [
        pytest.param((W[:1], b), "weights", id="too-few-weights"),
        pytest.param((W, [*b, np.zeros(2)]), "biases", id="too-many-biases"),
        pytest.param(with_(1, "W", np.ones((5, 2))), r"weights\[1\]", id="transposed-last"),
        pytest.param(with_(1, "b", np.zeros(3)), r"biases\[1\]", id="bias-wrong-length"),
        pytest.param(with_(0, "W", np.ones((5, 3, 1))), r"weights\[0\]", id="3d-weight"),
        pytest.param(with_(1, "b", nan_b), r"biases\[1\].*NaN", id="nan-bias"),
        pytest.param(with_(1, "W", inf_w), r"weights\[1\].*(NaN|inf)", id="inf-weight"),
        pytest.param(with_(1, "W", np.full((2, 5), "a")), r"weights\[1\]", id="strings"),
        pytest.param(("W", b), "weights", id="weights-not-a-list"),
    ]


@pytest.mark.parametrize(("args", "pattern"), _bad_parameter_cases())
def test_set_parameters_validates_and_changes_nothing(args, pattern):
    m = gpubp.MLP([3, 5, 2], seed=1)
    before = m.get_parameters()
    with pytest.raises((ValueError, TypeError), match=pattern):
        m.set_parameters(*args)
    assert_params_equal(m.get_parameters(), before)


def test_set_parameters_refuses_values_that_overflow_the_model_dtype():
    """1e300 is finite in float64 but infinite once stored in a float32 model."""
    m = gpubp.MLP([3, 5, 2], seed=1)
    before = m.get_parameters()
    W = [w.astype(np.float64) for w in before[0]]
    W[1][0, 0] = 1e300
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        m.set_parameters(W, before[1])
    assert_params_equal(m.get_parameters(), before)


def test_layer_sizes_may_be_a_numpy_array():
    model = gpubp.MLP(np.array([4, 8, 3]))
    assert model.layer_sizes == (4, 8, 3)


def test_dtype_none_is_refused():
    with pytest.raises(ValueError, match="dtype=None"):
        gpubp.MLP([4, 3], dtype=None)


def test_optimizer_refuses_a_new_model_after_its_owner_is_freed():
    """CPython reuses ids: the binding must not mistake a new model for the freed one."""
    import gc

    x = np.ones((4, 3), np.float32)
    y = np.array([0, 1, 0, 1])
    opt = optim.SGD(lr=0.1, momentum=0.9)
    first = gpubp.MLP([3, 4, 2])
    first.train_step(x, y, opt)
    del first
    gc.collect()
    for sizes in ([3, 4, 2], [3, 7, 2]):
        model = gpubp.MLP(sizes)
        before = opt.state_dict()
        with pytest.raises(ValueError, match="another model"):
            model.train_step(x, y, opt)
        after = opt.state_dict()
        assert after["step"] == before["step"] == 1
        for a, b in zip(after["momentum_buffer"], before["momentum_buffer"]):
            np.testing.assert_array_equal(a, b)
    opt.reset()
    assert np.isfinite(model.train_step(x, y, opt))
