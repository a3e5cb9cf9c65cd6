"""Arrays of other libraries in (DLPack, no copy on the CPU), torch.nn.Sequential out and in."""

from __future__ import annotations

import numpy as np
import pytest

import gpubp
from gpubp import reference
from gpubp.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
from gpubp.preprocessing import Preprocessing

from .conftest import skip_unless_available

TOL = {"float32": 2e-4, "float64": 1e-10}
CPU_BACKENDS = ("numpy", "numba")


def close(got, want, dtype) -> None:
    want = np.asarray(want, dtype=np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(np.asarray(got, dtype=np.float64) - want).max()) / scale
    assert err <= TOL[dtype], f"relative error {err:.2e} > {TOL[dtype]:g}"


class Producer:
    """A DLPack array that is nothing else (no ``__array__``, no buffer): a stand-in for a JAX
    array, read the way gpubp reads any library's."""

    def __init__(self, a: np.ndarray, device: tuple[int, int] = (1, 0)) -> None:
        self._a, self._device = a, device

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device

    def __dlpack__(self, **kwargs):
        if self._device[0] != 1 and kwargs.get("dl_device") is None:
            raise BufferError("the data is on the GPU; ask for a copy to the CPU")
        return self._a.__dlpack__(**kwargs)


# --- arrays in ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_a_cpu_tensor_reaches_the_backend_without_a_copy(name, rng, monkeypatch):
    torch = pytest.importorskip("torch")
    skip_unless_available(name)
    model = gpubp.MLP([37, 5, 3], backend=name, dtype="float32")
    t = torch.from_numpy(rng.normal(size=(9, 37)).astype(np.float32))
    checked = model.check_x(t)
    assert checked.__array_interface__["data"][0] == t.data_ptr()

    seen = []
    be = model.backend
    real = be.forward_layer

    def spy(a, *args, **kwargs):
        seen.append(a)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(be, "forward_layer", spy)
    out = model.forward(t)
    assert np.shares_memory(seen[0], t.numpy())  # the first layer read the tensor's memory
    monkeypatch.undo()
    np.testing.assert_array_equal(out, model.forward(t.numpy()))


def test_a_tensor_that_requires_grad_is_read_as_it_is(rng):
    torch = pytest.importorskip("torch")
    model = gpubp.MLP([4, 3], backend="numpy", dtype="float64")
    t = torch.tensor(rng.normal(size=(2, 4)), requires_grad=True)
    assert np.shares_memory(model.check_x(t), t.detach().numpy())
    assert t.requires_grad and t.grad is None


def test_tensors_work_wherever_arrays_do(backend_name, dtype, rng):
    torch = pytest.importorskip("torch")
    X = rng.normal(size=(21, 13)) * 50 + 7
    y = rng.integers(0, 4, 21)
    p = Preprocessing.standardize(X)

    def fresh():
        return gpubp.MLP([13, 10, 4], backend=backend_name, dtype=dtype, preprocessing=p)

    a, b = fresh(), fresh()
    tX = torch.tensor(X.astype(dtype))
    ty = torch.tensor(y)
    close(a.forward(tX), b.forward(X.astype(dtype)), dtype)
    np.testing.assert_array_equal(a.predict(tX[:1]), b.predict(X[:1].astype(dtype)))
    assert a.evaluate(tX, ty)["accuracy"] == b.evaluate(X.astype(dtype), y)["accuracy"]
    a.train_step(tX, ty, gpubp.optim.SGD(lr=0.05))
    b.train_step(X.astype(dtype), y, gpubp.optim.SGD(lr=0.05))
    a.fit(tX, ty, epochs=1, batch_size=8, validation_data=(tX, ty), progress=False)
    b.fit(X.astype(dtype), y, epochs=1, batch_size=8, validation_data=(X, y), progress=False)
    (Wa, ba), (Wb, bb) = a.get_parameters(), b.get_parameters()
    for got, want in zip(Wa + ba, Wb + bb):
        close(got, want, dtype)
    a.set_parameters([torch.tensor(w) for w in Wb], [torch.tensor(v) for v in bb])
    close(a.forward(X), b.forward(X), dtype)


def test_any_dlpack_array_is_read_without_a_copy(rng):
    x = rng.normal(size=(3, 5))
    model = gpubp.MLP([5, 2], backend="numpy", dtype="float64")
    checked = model.check_x(Producer(x))
    assert np.shares_memory(checked, x)
    W, b = model.get_parameters()
    close(model.forward(Producer(x)), reference.forward(W, b, x, "relu", "softmax"), "float64")


def test_a_gpu_array_on_a_cpu_backend_is_copied_explicitly(rng):
    x = rng.normal(size=(4, 6))
    model = gpubp.MLP([6, 2], backend="numpy", dtype="float64")
    checked = model.check_x(Producer(x, device=(2, 0)))  # kDLCUDA: asked for a host copy
    np.testing.assert_array_equal(checked, x)
    assert not np.shares_memory(checked, x)


def test_an_unreadable_dlpack_array_names_the_argument():
    class Broken(Producer):
        def __dlpack__(self, **kwargs):
            raise BufferError("cannot export")

    model = gpubp.MLP([2, 2], backend="numpy")
    with pytest.raises(TypeError, match=r"x \(.*Broken\) could not be read through DLPack"):
        model.forward(Broken(np.zeros((1, 2))))


def test_a_refused_tensor_leaves_the_parameters_unchanged():
    torch = pytest.importorskip("torch")
    model = gpubp.MLP([3, 2], backend="numpy")
    before = model.get_parameters()
    with pytest.raises(ValueError, match="contains NaN"):
        model.train_step(torch.tensor([[np.nan, 0.0, 1.0]]), torch.tensor([1]), gpubp.optim.SGD())
    (W, b), (W0, b0) = model.get_parameters(), before
    for got, want in zip(W + b, W0 + b0):
        np.testing.assert_array_equal(got, want)


# --- torch.nn.Sequential out and in ------------------------------------------------------------

PAIRS = [(h, o) for h in HIDDEN_ACTIVATIONS for o in OUTPUT_ACTIVATIONS]


def _loss(output: str) -> str:
    return {"softmax": "cross_entropy", "sigmoid": "binary_cross_entropy"}.get(output, "mse")


@pytest.mark.parametrize(("hidden", "output"), PAIRS)
def test_to_torch_gives_the_same_outputs(hidden, output, dtype, rng):
    torch = pytest.importorskip("torch")
    model = gpubp.MLP(
        [11, 33, 7, 5], hidden, output, _loss(output), backend="numpy", dtype=dtype, seed=3
    )
    W, b = model.get_parameters()
    model.set_parameters(W, [rng.normal(size=v.shape) for v in b])  # biases that show
    seq = model.to_torch()
    kinds = [type(m).__name__ for m in seq]
    act = {"identity": "Identity", "relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid",
           "leaky_relu": "LeakyReLU", "softmax": "Softmax"}  # fmt: skip
    tail = [] if output == "identity" else [act[output]]
    assert kinds == ["Linear", act[hidden], "Linear", act[hidden], "Linear", *tail]
    assert seq[0].weight.dtype == getattr(torch, dtype)
    x = rng.normal(size=(1, 11)) * 3  # a batch of one
    with torch.no_grad():
        got = seq(torch.tensor(x, dtype=getattr(torch, dtype))).numpy()
    W, b = model.get_parameters()
    close(got, reference.forward(W, b, x, hidden, output), dtype)
    close(got, model.forward(x), dtype)


def test_to_torch_folds_the_preprocessing_into_the_first_layer(dtype, rng):
    torch = pytest.importorskip("torch")
    X = rng.normal(size=(30, 9)) * rng.uniform(1, 100, 9) + rng.uniform(-100, 100, 9)
    model = gpubp.MLP(
        [9, 17, 3], "tanh", backend="numpy", dtype=dtype, preprocessing=Preprocessing.standardize(X)
    )
    seq = model.to_torch()
    assert len(seq) == 4  # Linear, Tanh, Linear, Softmax: the preprocessing is inside Linear 1
    with torch.no_grad():
        got = seq(torch.tensor(X, dtype=getattr(torch, dtype))).numpy()
    W, b = model.get_parameters()
    want = reference.forward(W, b, model.preprocessing.apply(X), "tanh", "softmax")
    close(got, want, dtype)


@pytest.mark.parametrize("hidden", HIDDEN_ACTIVATIONS)
@pytest.mark.parametrize("output", OUTPUT_ACTIVATIONS)
def test_from_torch_reads_a_sequential(hidden, output, dtype, rng):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(int(rng.integers(1 << 31)))
    act = {
        "identity": nn.Identity,
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "softmax": lambda: nn.Softmax(dim=1),
    }
    tdtype = getattr(torch, dtype)
    layers = [nn.Linear(6, 31, dtype=tdtype), act[hidden](), nn.Linear(31, 4, dtype=tdtype)]
    if output != "identity":
        layers.append(act[output]())
    seq = nn.Sequential(*layers)
    model = gpubp.MLP.from_torch(seq, backend="numpy")
    assert (model.activation, model.output, model.loss) == (hidden, output, _loss(output))
    assert model.dtype.name == dtype and model.layer_sizes == (6, 31, 4)
    x = rng.normal(size=(17, 6))
    with torch.no_grad():
        want = seq(torch.tensor(x, dtype=tdtype)).numpy()
    close(model.forward(x), want, dtype)


@pytest.mark.parametrize(
    ("loss", "output", "torch_loss"),
    [("cross_entropy", "softmax", "CrossEntropyLoss"), ("binary_cross_entropy", "sigmoid", None)],
)
def test_from_torch_of_a_usual_classifier_takes_its_output_from_the_loss(
    loss, output, torch_loss, rng
):
    """A PyTorch classifier ends in Linear (the softmax is inside CrossEntropyLoss): asked for
    cross_entropy, gpubp gives it a softmax output, and the loss equals PyTorch's."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    n_out = 3 if output == "softmax" else 1
    seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, n_out)).double()
    m = gpubp.MLP.from_torch(seq, loss=loss, backend="numpy")
    assert (m.output, m.loss) == (output, loss)
    if torch_loss is not None:
        x = rng.normal(size=(5, 4))
        y = np.array([0, 2, 1, 1, 0])
        with torch.no_grad():
            want = getattr(nn, torch_loss)()(seq(torch.tensor(x)), torch.tensor(y)).item()
        close(np.array(m.evaluate(x, y)["loss"]), np.array(want), "float64")


def test_from_torch_round_trip_and_defaults(rng):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    model = gpubp.MLP([5, 8, 8, 1], "leaky_relu", "sigmoid", "binary_cross_entropy",
                      backend="numpy", dtype="float64")  # fmt: skip
    back = gpubp.MLP.from_torch(model.to_torch(), backend="numpy")
    assert back.config() == {**model.config(), "seed": back.seed}
    (W, b), (W0, b0) = back.get_parameters(), model.get_parameters()
    for got, want in zip(W + b, W0 + b0):
        np.testing.assert_array_equal(got, want)
    # no activation between Linears: identity; no bias: zero; loss given explicitly
    seq = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2), nn.Sigmoid())
    m = gpubp.MLP.from_torch(seq, loss="mse", backend="numpy")
    assert (m.activation, m.output, m.loss) == ("identity", "sigmoid", "mse")
    np.testing.assert_array_equal(m.get_parameters()[1][0], np.zeros(4))
    x = rng.normal(size=(2, 3)).astype(np.float32)
    with torch.no_grad():
        close(m.forward(x), seq(torch.tensor(x)).numpy(), "float32")


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Dropout(), nn.Linear(4, 2)), ValueError,
         r"seq\[1\] is Dropout, which gpubp has no equivalent of; from_torch reads Linear"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)),
         ValueError, r"seq\[1\] is LeakyReLU\(negative_slope=0.2\); gpubp's leaky_relu has the "
         "slope 0.01"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=0)), ValueError,
         r"seq\[1\] is Softmax\(dim=0\)"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)),
         ValueError, "softmax on the output only"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(),
                                  nn.Linear(4, 2)), ValueError, "different activations"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2)),
         ValueError, r"seq\[2\] is a second activation"),
        (lambda nn: nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), ValueError,
         r"seq\[0\] is ReLU before any Linear"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), ValueError,
         "Linear number 2 takes 5 inputs but the one before gives 4"),
        (lambda nn: nn.Sequential(nn.ReLU()), ValueError, "before any Linear"),
        (lambda nn: nn.Sequential(), ValueError, "holds no Linear layer"),
        (lambda nn: nn.Linear(3, 4), TypeError, "seq must be a torch.nn.Sequential"),
        (lambda nn: nn.Sequential(nn.Linear(3, 4).half()), ValueError,
         "the Linear weights are float16; pass dtype="),
    ],
)  # fmt: skip
def test_from_torch_refuses_what_it_cannot_represent(build, error, message):
    torch = pytest.importorskip("torch")
    with pytest.raises(error, match=message):
        gpubp.MLP.from_torch(build(torch.nn), backend="numpy")


def test_without_torch_the_error_says_how_to_install_it(hide_module):
    model = gpubp.MLP([2, 2], backend="numpy")
    hide_module("torch")
    with pytest.raises(ImportError, match="pip install torch"):
        model.to_torch()
    with pytest.raises(ImportError, match="pip install torch"):
        gpubp.MLP.from_torch(object())
    model.forward(np.zeros((1, 2)))  # everything else works without it


def test_from_torch_reads_bfloat16_weights_into_the_dtype_asked_for():
    """NumPy has no bfloat16, so torch's .numpy() refuses such tensors: they are converted to
    the model's dtype first (exactly: every bfloat16 is a float32)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    seq = seq.to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype='float32'"):
        gpubp.MLP.from_torch(seq, backend="numpy")
    model = gpubp.MLP.from_torch(seq, backend="numpy", dtype="float32")
    W, _ = model.get_parameters()
    np.testing.assert_array_equal(W[0], seq[0].weight.detach().float().numpy())
    x = torch.randn(6, 5)
    want = seq.float()(x).detach().numpy()
    np.testing.assert_allclose(model.forward(x.numpy()), want, rtol=1e-5, atol=1e-6)
