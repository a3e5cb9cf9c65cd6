"""Every available backend against the float64 reference, the protocol's signatures, the registry,
and the ops' ``out=`` buffers.

Each test body runs once per backend name and dtype (see ``conftest.py``); a backend that cannot
run here is skipped with the reason the registry gives.
"""

from __future__ import annotations

import inspect
import os
import re

import numpy as np
import pytest

import gpubp
from gpubp import reference as ref
from gpubp.backends import _CLASSES, BACKEND_NAMES, OPS, Backend, to_numpy, use_backend
from gpubp.check import TOLERANCE, check_configuration, combinations, random_problem, rel_error

COMBINATIONS = combinations()
#: The hidden activations and the (output, loss) pairs, in the order of ``combinations()``.
HIDDEN_ACTIVATIONS = tuple(dict.fromkeys(a for a, _, _ in COMBINATIONS))
PAIRS = tuple(dict.fromkeys((o, loss) for _, o, loss in COMBINATIONS))

#: ``(layer sizes, batch)``: batch 1, widths 1, 3, 33 and 257, depths 1 to 4.
SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((3, 1), 1),
    ((1, 3, 1), 7),
    ((33, 257, 3), 1),
    ((5, 33, 1, 3), 7),
    ((4, 3, 33, 257, 2), 7),
)
LARGE_SHAPES = (SHAPES[0], SHAPES[2], SHAPES[4])
LARGE_SCALE = 30.0


def grid(shapes) -> list[tuple[tuple[int, ...], int, str, str, str]]:
    """``(sizes, batch, activation, output, loss)`` cases that meet every pair of factors.

    Every combination runs once on a deep shape (one with a hidden layer), picked as in a Latin
    square, ``deep[(h + p) % len(deep)]`` for hidden activation ``h`` and pair ``p``, so that
    every (output, loss) pair and every hidden activation meet every deep shape. A shape without
    a hidden layer never applies the hidden activation, so there each (output, loss) pair runs
    once (the other four hidden activations would repeat the same computation). The full
    cross product (5 times the cases) found nothing these miss: the ops are elementwise in the
    activation and per layer in the shape, and the mutation run (tools/mutate.py) checks it.
    """
    deep = [s for s in shapes if len(s[0]) > 2]
    cases = [
        (sizes, batch, HIDDEN_ACTIVATIONS[0], output, loss)
        for sizes, batch in shapes
        if len(sizes) == 2
        for output, loss in PAIRS
    ]
    for h, activation in enumerate(HIDDEN_ACTIVATIONS):
        for p, (output, loss) in enumerate(PAIRS):
            sizes, batch = deep[(h + p) % len(deep)]
            cases.append((sizes, batch, activation, output, loss))
    return cases


def _case_id(case) -> str:
    sizes, batch, activation, output, loss = case
    return f"{activation}-{output}-{loss}-{'-'.join(map(str, sizes))}x{batch}"


GRID = grid(SHAPES)
LARGE_GRID = grid(LARGE_SHAPES)
GRID_IDS = [_case_id(c) for c in GRID]
LARGE_GRID_IDS = [_case_id(c) for c in LARGE_GRID]

#: Outputs whose float32 derivative is taken from a saturated output (``a (1 - a)``, ``1 - a^2``,
#: ``softmax - onehot``): with inputs ~30 the true output gradient is ~1e-9 of the activations,
#: below float32's resolution, so float32 returns 0 or rounding noise for it.
SATURATING_OUTPUTS = ("sigmoid", "tanh", "softmax")
HIDDEN_SATURATING = ("sigmoid", "tanh")


def _report(result) -> str:
    errs = ", ".join(f"{k}={v:.3g}" for k, v in result.errors.items())
    return (
        f"{result.backend} {result.dtype} sizes={result.sizes} batch={result.batch} "
        f"{result.activation}/{result.output}/{result.loss}: worst {result.worst:.3g} > "
        f"{TOLERANCE[result.dtype]:g}; errors: {errs}"
    )


def _failing(result) -> set[str]:
    return {k for k, v in result.errors.items() if not v <= TOLERANCE[result.dtype]}


ADAM_L2_FLOAT32 = (
    "float32 Adam+L2 step ill-conditioned: where g ~ -wd * p (check's 'adam' has wd = 0.01) the "
    "sum g + wd * p cancels to ~eps = 1e-8, and one float32 rounding of it moves Adam's "
    "normalised step by per cents (the update maths is checked on well-conditioned gradients "
    "in test_optim.py)"
)
SATURATED_FLOAT32 = (
    "float32 gradient of a saturated output: f' taken from a float32 output a(1-a), 1-a^2 or "
    "softmax - onehot is below float32 resolution (true values ~1e-9 of the activations)"
)
LOSS_RESOLUTION = (
    "loss value below the resolution of its formula: the log-losses are sums of B*n terms of "
    "size |z| that cancel, so an absolute error of a few eps * sum|z| / B is rounding, yet "
    "check_configuration divides it by the (tiny) loss itself"
)


#: each explanation above in a few words: what an xfail line says (the long text is here)
SHORT_REASON = {
    ADAM_L2_FLOAT32: "Adam+L2 cancellation",
    SATURATED_FLOAT32: "saturated output gradient",
    LOSS_RESOLUTION: "loss below its resolution",
}


def xfail_reason(reasons: list[str], result) -> str:
    """One short line for an xfail: the known limits by their short names, and the worst error."""
    known = "; ".join(SHORT_REASON[r] for r in reasons)
    return f"known limit: {known} ({result.backend} {result.dtype}, worst {result.worst:.2g})"


def _loss_within_rounding(result, scale: float) -> bool:
    """Whether the loss error is below ``16 eps sum|z| / B`` (rebuilds check's problem)."""
    rng = np.random.default_rng(result.seed)
    W, b, x, y = random_problem(result.sizes, result.batch, result.loss, result.output, rng, scale)
    dt = result.dtype
    W = [w.astype(dt).astype(np.float64) for w in W]
    b = [v.astype(dt).astype(np.float64) for v in b]
    x = x.astype(dt).astype(np.float64)
    z = ref.forward(W, b, x, result.activation, "identity")
    rvalue, _, _ = ref.gradients(W, b, x, y, result.activation, result.output, result.loss)
    abs_err = result.errors["loss"] * max(abs(rvalue), 1e-30)
    bound = 16 * float(np.finfo(dt).eps) * float(np.sum(np.abs(z))) / result.batch
    return abs_err <= bound + TOLERANCE[dt] * abs(rvalue)


def _one_output_cross_entropy_refused(sizes, loss) -> bool:
    """A softmax over one output is constant: the reference and MLP refuse cross_entropy there."""
    if loss != "cross_entropy" or sizes[-1] > 1:
        return False
    with pytest.raises(ValueError, match="at least 2 outputs"):
        ref.output_delta(np.zeros((2, 1)), np.zeros(2, dtype=np.int64), "softmax", loss)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        gpubp.MLP(list(sizes), output="softmax", loss=loss)
    return True


def _check(backend_name, dtype, sizes, batch, activation, output, loss, seed, scale=1.0):
    result = check_configuration(
        backend_name, dtype, sizes, batch, activation, output, loss, seed=seed, scale=scale
    )
    result.seed = seed  # kept for _loss_within_rounding, which rebuilds the same problem
    return result


def _known_issues(result, scale: float) -> list[str] | None:
    """The reasons that explain every failing error of ``result``, or None if some are not.

    Only explanations that are reported (see the module's final notes) are accepted, and each
    only for the errors it can cause: the forward pass, float64 and the scale-1 gradients of
    non-saturating outputs must always pass.
    """
    failing = _failing(result)
    explained: set[str] = set()
    reasons = []
    if scale > 1 and result.dtype == "float32" and "step:adam" in failing:
        explained.add("step:adam")
        reasons.append(ADAM_L2_FLOAT32)
    if scale > 1:
        # f' from a saturated float32 output: the output layer's, or a hidden tanh/sigmoid's
        # (1 - a^2 of a tanh that rounded to 1 is 0), which every delta below it multiplies
        saturating = result.output in SATURATING_OUTPUTS or result.activation in HIDDEN_SATURATING
        if result.dtype == "float32" and saturating:
            if failing & {"dW", "db", "loss"}:
                explained |= {"dW", "db", "loss"}
                reasons.append(SATURATED_FLOAT32)
    if "loss" in failing and "loss" not in explained and _loss_within_rounding(result, scale):
        explained.add("loss")
        reasons.append(LOSS_RESOLUTION)
    return reasons if failing <= explained else None


# --- (1) every backend x dtype x combination x shape against the reference ---------------------


def test_an_xfail_says_why_in_one_short_line():
    """The suite prints one line per xfail: the known limit's short name, not its essay."""
    from types import SimpleNamespace

    result = SimpleNamespace(backend="numba", dtype="float32", worst=0.0123, sizes=(7,) * 30)
    every = list(SHORT_REASON)
    for reasons in [[r] for r in every] + [every]:
        line = xfail_reason(reasons, result)
        assert "\n" not in line and len(line) <= 120, line


def test_the_grids_meet_every_pair_of_factors():
    for shapes, cases in ((SHAPES, GRID), (LARGE_SHAPES, LARGE_GRID)):
        deep = [(s, b) for s, b in shapes if len(s) > 2]
        combos = {(a, o, loss) for s, b, a, o, loss in cases if len(s) > 2}
        assert combos == set(COMBINATIONS)  # every combination, with a hidden layer
        for sizes, batch in shapes:
            on = [c for c in cases if c[:2] == (sizes, batch)]
            assert {(o, loss) for _, _, _, o, loss in on} == set(PAIRS)
            if (sizes, batch) in deep:
                assert {a for _, _, a, _, _ in on} == set(HIDDEN_ACTIVATIONS)
    assert len(GRID) == len(set(GRID))


@pytest.mark.parametrize(("sizes", "batch", "activation", "output", "loss"), GRID, ids=GRID_IDS)
def test_backend_matches_reference(
    backend_name, dtype, seed, sizes, batch, activation, output, loss
):
    if _one_output_cross_entropy_refused(sizes, loss):
        return
    result = _check(backend_name, dtype, sizes, batch, activation, output, loss, seed)
    assert set(result.errors) >= {"forward", "loss", "dW", "db", "step:sgd", "step:adam"}
    _assert_ok_or_known(result, 1.0)


def _assert_ok_or_known(result, scale: float) -> None:
    """Pass, xfail with the reported explanation that covers every failing error, or fail."""
    if not result.ok and (reasons := _known_issues(result, scale)):
        pytest.xfail(xfail_reason(reasons, result))
    assert result.ok, _report(result)


@pytest.mark.parametrize(
    ("sizes", "batch", "activation", "output", "loss"), LARGE_GRID, ids=LARGE_GRID_IDS
)
def test_backend_matches_reference_large_inputs(
    backend_name, dtype, seed, sizes, batch, activation, output, loss
):
    """Inputs ~N(0, 30^2): saturated sigmoids and tanhs, logits in the hundreds."""
    if _one_output_cross_entropy_refused(sizes, loss):
        return
    result = _check(backend_name, dtype, sizes, batch, activation, output, loss, seed, LARGE_SCALE)
    # nothing may come out NaN or infinite, whatever the dtype
    assert all(np.isfinite(v) for v in result.errors.values()), _report(result)
    _assert_ok_or_known(result, LARGE_SCALE)


def _uses_base_activations(backend) -> bool:
    return type(backend).forward_layer is Backend.forward_layer


def test_sigmoid_relative_accuracy_for_negative_inputs(request, backend, dtype):
    z = np.array([[-30.0, -20.0, -10.0, -1.0, 0.0, 2.0]])
    expected = 1.0 / (1.0 + np.exp(-z))  # float64, relatively accurate for z < 0
    W = backend.asarray(np.eye(6), dtype)
    a = backend.forward_layer(backend.asarray(z, dtype), W, backend.zeros((6,), dtype), "sigmoid")
    got = to_numpy(a).astype(np.float64)
    tol = 1e3 * float(np.finfo(dtype).eps)  # a thousand ulps, relative, entry by entry
    np.testing.assert_allclose(got, expected, rtol=tol, atol=0)


def test_check_can_fail(backend_name):
    """check_configuration is not a tautology: a backend whose hidden_delta drops f' fails."""
    be = gpubp.get_backend(backend_name)

    class Broken(type(be)):  # type: ignore[misc]
        def hidden_delta(self, delta_next, W_next, a, activation, *, out=None, scratch=None):
            return self.xp.matmul(delta_next, W_next, out=out)

        def kernel(self, name):  # the cupy backend's fused step launches the kernel itself
            if "hidden_delta" in name:
                return lambda grid, block, args: None  # g *= f'(a) never happens
            return super().kernel(name)

    broken = Broken()
    result = check_configuration(
        broken, "float64", (3, 4, 2), 5, "tanh", "softmax", "cross_entropy"
    )
    assert not result.ok
    assert result.errors["dW"] > 1e-3 and result.errors["forward"] <= 1e-12
    assert _known_issues(result, LARGE_SCALE) is None  # and no excuse covers it


# --- (2) signatures ------------------------------------------------------------------------------


def _backend_classes() -> list[type]:
    seen: list[type] = []
    todo = [Backend, *_CLASSES.values()]
    while todo:  # every imported subclass too, registered or not
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in seen if c.__module__.startswith("gpubp.")]


BACKEND_CLASSES = _backend_classes()


def test_ops_are_the_reference_functions_in_order():
    src = inspect.getsource(ref)
    positions = [src.index(f"\ndef {op}(") for op in OPS]
    assert positions == sorted(positions), "OPS is not in the reference's order"
    for op in OPS:
        assert inspect.isfunction(getattr(ref, op)), op


@pytest.mark.parametrize("cls", BACKEND_CLASSES, ids=lambda c: c.__qualname__)
@pytest.mark.parametrize("op", OPS)
def test_backend_signatures_match_reference(cls, op):
    ref_params = list(inspect.signature(getattr(ref, op)).parameters.values())
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in ref_params)
    method = getattr(cls, op, None)
    assert callable(method), f"{cls.__qualname__} has no op {op!r}"
    params = list(inspect.signature(method).parameters.values())
    assert params and params[0].name == "self", f"{cls.__qualname__}.{op} is not a method"
    params = params[1:]
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [p.name for p in positional] == [p.name for p in ref_params], (
        f"{cls.__qualname__}.{op}{inspect.signature(method)} does not take the reference's "
        f"positional arguments {[p.name for p in ref_params]}"
    )
    for p, r in zip(positional, ref_params, strict=True):
        assert p.kind is p.POSITIONAL_OR_KEYWORD, f"{op}: {p.name} is positional-only"
        assert p.default == r.default, f"{op}: default of {p.name} differs from the reference"
    for p in params[len(positional) :]:
        assert p.kind is p.KEYWORD_ONLY and p.default is not p.empty, (
            f"{cls.__qualname__}.{op}: extra parameter {p.name!r} ({p.kind.description}) must "
            "be keyword-only with a default"
        )


def test_signature_check_catches_a_swapped_argument():
    class Swapped(Backend):
        def hidden_delta(self, W_next, delta_next, a, activation, *, out=None, scratch=None):
            raise NotImplementedError

    ref_names = list(inspect.signature(ref.hidden_delta).parameters)
    got = list(inspect.signature(Swapped.hidden_delta).parameters)[1:5]
    assert got != ref_names
    with pytest.raises(AssertionError):
        test_backend_signatures_match_reference(Swapped, "hidden_delta")
    with pytest.raises(AssertionError):

        class Extra(Backend):
            def forward_layer(self, a_prev, W, b, activation, out=None):
                raise NotImplementedError

        test_backend_signatures_match_reference(Extra, "forward_layer")


# --- (3) the registry -----------------------------------------------------------------------------


def test_backend_status_and_available_backends():
    status = gpubp.backend_status()
    assert list(status) == list(BACKEND_NAMES)
    for name, why in status.items():
        assert why is None or (isinstance(why, str) and why), name
    available = gpubp.available_backends()
    assert available == [n for n in BACKEND_NAMES if status[n] is None]
    assert "numpy" in available  # NumPy needs nothing but NumPy


@pytest.mark.parametrize("bad", ["torch", "NumPy", "", " numpy", 3, 1.5, ["numpy"]])
def test_unknown_backend_name_raises_value_error(bad):
    with pytest.raises(ValueError, match="backend") as info:
        gpubp.get_backend(bad)
    msg = str(info.value)
    assert repr(bad) in msg  # says what was passed ...
    for name in ("auto", *BACKEND_NAMES):  # ... and what is understood
        assert name in msg


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_unavailable_backend_error_says_why_and_what_else(name):
    why = gpubp.backend_status()[name]
    if why is None:
        pytest.skip(f"backend {name!r} is available here")
    with pytest.raises(gpubp.BackendUnavailableError) as info:
        gpubp.get_backend(name)
    msg = str(info.value)
    assert repr(name) in msg
    assert why in msg
    others = [n for n in gpubp.available_backends() if n != name]
    assert others and all(n in msg for n in others)
    assert "auto" in msg
    assert isinstance(info.value, RuntimeError)
    # and a model asked for it reports the same, before building anything
    with pytest.raises(gpubp.BackendUnavailableError):
        gpubp.MLP([2, 2], backend=name)


def test_auto_returns_the_best_available_backend():
    # the first available, except a stand-in for CuPy (GPUBP_CUPY_MODULE, the emulated GPU in
    # the tests), which auto never takes (it is far slower)
    emulated = os.environ.get("GPUBP_CUPY_MODULE", "cupy") != "cupy"
    best = next(n for n in gpubp.available_backends() if not (emulated and n == "cupy"))
    if emulated:
        assert best != "cupy" and "cupy" in gpubp.available_backends()
    for arg in ("auto", None):
        be = gpubp.get_backend(arg)
        assert isinstance(be, Backend)
        assert be.name == best
    assert gpubp.get_backend() is gpubp.get_backend(best)  # one instance per name


def test_get_backend_passes_backend_objects_through(backend):
    assert gpubp.get_backend(backend) is backend
    assert gpubp.get_backend(backend.name) is backend
    assert repr(backend) == f"<gpubp backend {backend.name!r}>"


def test_use_backend_nests_and_restores(backend_name):
    default = gpubp.get_backend("auto")
    other = "numpy" if backend_name != "numpy" else gpubp.available_backends()[0]
    with use_backend(backend_name) as outer:
        assert outer is gpubp.get_backend(backend_name)
        assert gpubp.get_backend("auto") is outer
        with use_backend(other) as inner:
            assert gpubp.get_backend("auto") is inner
            assert inner.name == other
            # an explicit name still wins inside the block
            assert gpubp.get_backend(backend_name) is outer
        assert gpubp.get_backend("auto") is outer
        m = gpubp.MLP([2, 3, 2], dtype="float64")
        assert m.backend is outer
    assert gpubp.get_backend("auto") is default


def test_use_backend_restores_after_an_exception(backend_name):
    default = gpubp.get_backend("auto")
    with pytest.raises(KeyError), use_backend(backend_name):
        assert gpubp.get_backend("auto").name == backend_name
        raise KeyError("boom")
    assert gpubp.get_backend("auto") is default


def test_use_backend_rejects_bad_names_without_changing_anything():
    default = gpubp.get_backend("auto")
    with pytest.raises(ValueError, match="backend"), use_backend("tensorflow"):
        pass  # pragma: no cover
    for name, why in gpubp.backend_status().items():
        if why is not None:
            with pytest.raises(gpubp.BackendUnavailableError), use_backend(name):
                pass  # pragma: no cover
    assert gpubp.get_backend("auto") is default


def test_to_numpy(backend, dtype, rng):
    host = rng.normal(size=(3, 4)).astype(dtype)
    assert gpubp.to_numpy(host) is host  # no copy for NumPy input
    lst = gpubp.to_numpy([[1.0, 2.0], [3.0, 4.0]])
    assert isinstance(lst, np.ndarray) and lst.shape == (2, 2) and lst[1, 0] == 3.0
    dev = backend.asarray(host, dtype)
    assert backend.owns(dev)
    back = gpubp.to_numpy(dev)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, host)
    np.testing.assert_array_equal(backend.to_numpy(dev), host)
    assert not backend.owns([1.0, 2.0])


# --- (4) ops write into the buffers they are given ----------------------------------------------


def _close(got, expected, dtype):
    err = rel_error(got, expected)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g}"


def _frozen_copies(arrays):
    return [np.array(to_numpy(a), copy=True) for a in arrays]


def _unchanged(before, arrays):
    for b, a in zip(before, arrays, strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)


@pytest.mark.parametrize(
    "activation", ["identity", "sigmoid", "tanh", "relu", "leaky_relu", "softmax"]
)
def test_forward_layer_writes_into_out(backend, dtype, rng, activation):
    B, n_in, n_out = 7, 33, 3
    a_prev = backend.asarray(rng.normal(size=(B, n_in)), dtype)
    W = backend.asarray(rng.normal(size=(n_out, n_in)) / 6, dtype)
    b = backend.asarray(rng.normal(size=n_out), dtype)
    inputs = [a_prev, W, b]
    before = _frozen_copies(inputs)
    expected = ref.forward_layer(*before, activation)
    for kw in ({}, {"scratch": backend.zeros((B, n_out), dtype)}):
        out = backend.zeros((B, n_out), dtype)
        got = backend.forward_layer(a_prev, W, b, activation, out=out, **kw)
        assert got is out
        assert got.dtype == np.dtype(dtype)
        _close(out, expected, dtype)
    fresh = backend.forward_layer(a_prev, W, b, activation)  # without out= it allocates
    _close(fresh, expected, dtype)
    _unchanged(before, inputs)


@pytest.mark.parametrize(
    ("output", "loss"),
    [
        (o, lo)
        for lo, outs in {
            "mse": ("identity", "sigmoid", "tanh", "relu", "softmax"),
            "cross_entropy": ("softmax",),
            "binary_cross_entropy": ("sigmoid",),
        }.items()
        for o in outs
    ],
)
def test_output_delta_writes_into_out(backend, dtype, rng, output, loss):
    B, n = 7, 3
    z_host = rng.normal(0.0, 2.0, (B, n))
    if loss == "cross_entropy":
        y_host = rng.integers(0, n, B)
        y = backend.asarray(y_host)
    else:
        y_host = rng.random((B, n))
        if loss == "binary_cross_entropy":
            y_host = (y_host < 0.5).astype(np.float64)
        y = backend.asarray(y_host, dtype)
    z = backend.asarray(z_host, dtype)
    z_rounded = to_numpy(z).astype(np.float64)
    exp_delta, exp_value = ref.output_delta(z_rounded, y_host, output, loss)
    kws = [{}, {"scratch": backend.zeros((B, n), dtype), "rowbuf": backend.zeros((B, 1), dtype)}]
    for kw in kws:
        out = backend.zeros((B, n), dtype)
        got, value = backend.output_delta(z, y, output, loss, out=out, **kw)
        assert got is out
        _close(out, exp_delta, dtype)
        assert abs(float(value) - exp_value) <= TOLERANCE[dtype] * abs(exp_value)
        np.testing.assert_array_equal(to_numpy(z), z_rounded.astype(dtype))  # z untouched
    # in place: out may be z itself
    z2 = backend.asarray(z_host, dtype).copy()
    got, value = backend.output_delta(z2, y, output, loss, out=z2)
    assert got is z2
    _close(z2, exp_delta, dtype)
    assert abs(float(value) - exp_value) <= TOLERANCE[dtype] * abs(exp_value)


@pytest.mark.parametrize("activation", ["identity", "sigmoid", "tanh", "relu", "leaky_relu"])
def test_hidden_delta_writes_into_out(backend, dtype, rng, activation):
    B, n, n_next = 7, 33, 3
    delta_next = backend.asarray(rng.normal(size=(B, n_next)), dtype)
    W_next = backend.asarray(rng.normal(size=(n_next, n)), dtype)
    a = backend.asarray(ref.activate(rng.normal(size=(B, n)), activation), dtype)
    inputs = [delta_next, W_next, a]
    before = _frozen_copies(inputs)
    expected = ref.hidden_delta(*before, activation)
    for kw in ({}, {"scratch": backend.zeros((B, n), dtype)}):
        out = backend.zeros((B, n), dtype)
        got = backend.hidden_delta(delta_next, W_next, a, activation, out=out, **kw)
        assert got is out
        _close(out, expected, dtype)
    _unchanged(before, inputs)


def test_parameter_gradients_write_into_buffers(backend, dtype, rng):
    B, n_in, n_out = 7, 33, 3
    delta = backend.asarray(rng.normal(size=(B, n_out)), dtype)
    a_prev = backend.asarray(rng.normal(size=(B, n_in)), dtype)
    before = _frozen_copies([delta, a_prev])
    exp_dW, exp_db = ref.parameter_gradients(*before)
    dW = backend.zeros((n_out, n_in), dtype)
    db = backend.zeros((n_out,), dtype)
    got_dW, got_db = backend.parameter_gradients(delta, a_prev, dW=dW, db=db)
    assert got_dW is dW and got_db is db
    _close(dW, exp_dW, dtype)
    _close(db, exp_db, dtype)
    _unchanged(before, [delta, a_prev])


def test_update_ops_work_in_place(backend, dtype, rng):
    shape = (3, 33)
    p_host, g_host = rng.normal(size=shape), rng.normal(size=shape)
    buf_host, m_host, v_host = rng.normal(size=shape), rng.normal(size=shape), rng.random(shape)
    cast = [backend.asarray(h, dtype).copy() for h in (p_host, g_host, buf_host)]
    p, g, buf = cast
    p0, g0, buf0 = (to_numpy(c).astype(np.float64) for c in cast)
    exp_p, exp_buf = ref.sgd_update(p0, g0, buf0, 0.1, 0.9, True, 0.01)
    scratch = backend.zeros((2 * p_host.size,), dtype)
    got_p, got_buf = backend.sgd_update(p, g, buf, 0.1, 0.9, True, 0.01, scratch=scratch)
    assert got_p is p and got_buf is buf
    _close(p, exp_p, dtype)
    _close(buf, exp_buf, dtype)
    np.testing.assert_array_equal(to_numpy(g), g0)  # the gradient is read only

    p, m, v = (backend.asarray(h, dtype).copy() for h in (p_host, m_host, v_host))
    p0, m0, v0 = (to_numpy(c).astype(np.float64) for c in (p, m, v))
    exp = ref.adam_update(p0, g0, m0, v0, 3, 0.01, 0.9, 0.999, 1e-8, 0.1, False)
    got = backend.adam_update(p, g, m, v, 3, 0.01, 0.9, 0.999, 1e-8, 0.1, False, scratch=scratch)
    assert got[0] is p and got[1] is m and got[2] is v
    for arr, e in zip((p, m, v), exp, strict=True):
        _close(arr, e, dtype)
    np.testing.assert_array_equal(to_numpy(g), g0)


#: Tensors of the many-tensor update test: a single element, awkward widths, and enough
#: elements together for the Numba backend's parallel pass (``update_par_min``).
MANY_SHAPES = [(1,), (3, 33), (70001,), (257, 3)]
MANY_DECAYS = [0.0, 0.1, 0.0, 1e-3]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_update_many_is_sgd_update_per_tensor(backend, dtype, rng, momentum):
    hosts = [(rng.normal(size=s), rng.normal(size=s), rng.normal(size=s)) for s in MANY_SHAPES]
    ps, gs, bufs = ([backend.asarray(h[i], dtype).copy() for h in hosts] for i in range(3))
    start = [[to_numpy(a).astype(np.float64) for a in col] for col in (ps, gs, bufs)]
    backend.sgd_update_many(
        ps, gs, bufs if momentum else [None] * len(ps), 0.05, momentum, True, MANY_DECAYS
    )
    for i, wd in enumerate(MANY_DECAYS):
        p0, g0, buf0 = (col[i] for col in start)
        exp_p, exp_buf = ref.sgd_update(p0, g0, buf0 if momentum else None, 0.05, momentum,
                                        True, wd)  # fmt: skip
        _close(ps[i], exp_p, dtype)
        if momentum:
            _close(bufs[i], exp_buf, dtype)
        np.testing.assert_array_equal(to_numpy(gs[i]), g0)  # the gradient is read only


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_update_many_is_adam_update_per_tensor(backend, dtype, rng, decoupled):
    hosts = [
        (rng.normal(size=s), rng.normal(size=s) * 1e3, rng.normal(size=s), rng.random(s))
        for s in MANY_SHAPES
    ]
    ps, gs, ms, vs = ([backend.asarray(h[i], dtype).copy() for h in hosts] for i in range(4))
    twins = [[a.copy() for a in col] for col in (ps, ms, vs)]
    start = [[to_numpy(a).astype(np.float64) for a in col] for col in (ps, gs, ms, vs)]
    backend.adam_update_many(ps, gs, ms, vs, 7, 0.01, 0.9, 0.999, 1e-8, MANY_DECAYS, decoupled)
    for i, wd in enumerate(MANY_DECAYS):
        p0, g0, m0, v0 = (col[i] for col in start)
        exp = ref.adam_update(p0, g0, m0, v0, 7, 0.01, 0.9, 0.999, 1e-8, wd, decoupled)
        for arr, e in zip((ps[i], ms[i], vs[i]), exp, strict=True):
            _close(arr, e, dtype)
        np.testing.assert_array_equal(to_numpy(gs[i]), g0)
        # the same numbers as the one-tensor op, bit for bit
        p1, m1, v1 = (col[i] for col in twins)
        backend.adam_update(p1, gs[i], m1, v1, 7, 0.01, 0.9, 0.999, 1e-8, wd, decoupled)
        for got, one in ((ps[i], p1), (ms[i], m1), (vs[i], v1)):
            np.testing.assert_array_equal(to_numpy(got), to_numpy(one))


def test_sum_of_squares_is_the_float64_sum(backend, dtype, rng):
    hosts = [rng.normal(size=s) * 10 for s in MANY_SHAPES]
    arrays = [backend.asarray(h, dtype) for h in hosts]
    expected = sum(float(np.sum(to_numpy(a).astype(np.float64) ** 2)) for a in arrays)
    got = float(backend.sum_of_squares(arrays))
    assert got == pytest.approx(expected, rel=1e-5 if dtype == "float32" else 1e-12)


def test_gradients_reuse_workspace_buffers(backend, dtype, rng):
    sizes, B = (5, 33, 3), 7
    W = [backend.asarray(rng.normal(size=(sizes[i + 1], sizes[i])) / 3, dtype) for i in range(2)]
    b = [backend.asarray(rng.normal(size=sizes[i + 1]), dtype) for i in range(2)]
    x = backend.asarray(rng.normal(size=(B, 5)), dtype)
    y = backend.asarray(rng.integers(0, 3, B))
    _, dW1, db1 = backend.gradients(W, b, x, y, "tanh", "softmax", "cross_entropy")
    first = [id(a) for a in (*dW1, *db1)]
    snapshot = _frozen_copies([*dW1, *db1])
    x2 = backend.asarray(rng.normal(size=(B, 5)), dtype)
    _, dW2, db2 = backend.gradients(W, b, x2, y, "tanh", "softmax", "cross_entropy")
    assert [id(a) for a in (*dW2, *db2)] == first  # the same buffers, overwritten
    assert any(not np.array_equal(s, to_numpy(a)) for s, a in zip(snapshot, [*dW2, *db2]))
    assert all(a.dtype == np.dtype(dtype) for a in (*dW2, *db2))
    Wr = [to_numpy(w).astype(np.float64) for w in W]
    br = [to_numpy(v).astype(np.float64) for v in b]
    _, rdW, rdb = ref.gradients(
        Wr, br, to_numpy(x2).astype(np.float64), to_numpy(y), "tanh", "softmax", "cross_entropy"
    )
    for got, exp in zip([*dW2, *db2], [*rdW, *rdb], strict=True):
        _close(got, exp, dtype)


def test_train_step_updates_in_place(backend, dtype, rng):
    sizes, B = (4, 3, 2), 5
    W = [backend.asarray(rng.normal(size=(sizes[i + 1], sizes[i])), dtype) for i in range(2)]
    b = [backend.asarray(rng.normal(size=sizes[i + 1]), dtype) for i in range(2)]
    x = backend.asarray(rng.normal(size=(B, 4)), dtype)
    y = backend.asarray(rng.integers(0, 2, B))
    opt = gpubp.optim.SGD(lr=0.1, momentum=0.9)
    state = opt.bind(None, backend, [w.shape for w in W] + [v.shape for v in b], dtype)
    ids = [id(a) for a in (*W, *b)]
    before = _frozen_copies([*W, *b])
    value, W2, b2, state2 = backend.train_step(
        W, b, x, y, "relu", "softmax", "cross_entropy", opt, state
    )
    assert W2 is W and b2 is b and state2 is state
    assert [id(a) for a in (*W, *b)] == ids
    assert state["step"] == 1
    assert np.isfinite(float(value))
    assert any(not np.array_equal(s, to_numpy(a)) for s, a in zip(before, [*W, *b]))
    _, rW, rb, _ = ref.train_step(
        before[:2],
        before[2:],
        to_numpy(x).astype(np.float64),
        to_numpy(y),
        "relu",
        "softmax",
        "cross_entropy",
        opt,
        {"step": 0, "momentum_buffer": [np.zeros(a.shape) for a in before]},
    )
    for got, exp in zip([*W, *b], [*rW, *rb], strict=True):
        _close(got, exp, dtype)


def test_train_step_rejects_non_finite_and_keeps_parameters(backend, dtype, rng):
    W = [backend.asarray(rng.normal(size=(2, 3)), dtype)]
    b = [backend.asarray(rng.normal(size=2), dtype)]
    x = backend.asarray(np.array([[np.inf, 0.0, 1.0]]), dtype)
    y = backend.asarray(rng.random((1, 2)), dtype)
    opt = gpubp.optim.Adam(lr=0.1)
    state = opt.bind(None, backend, [(2, 3), (2,)], dtype)
    before = _frozen_copies([*W, *b, *state["exp_avg"], *state["exp_avg_sq"]])
    with (
        pytest.raises(gpubp.NonFiniteLossError, match=re.escape("parameters kept")),
        np.errstate(invalid="ignore", over="ignore"),
    ):
        backend.train_step(W, b, x, y, "tanh", "identity", "mse", opt, state)
        backend.synchronize()  # a GPU backend may raise at its next synchronisation
    _unchanged(before, [*W, *b, *state["exp_avg"], *state["exp_avg_sq"]])
    assert state["step"] == 0


def test_accuracy_counts_follow_numpy(backend, dtype, rng):
    """The counts evaluate() uses (on a GPU, gpubp's metrics kernels): NumPy's argmax rule
    (first maximum, NaN counts as the maximum), labels or one-hot rows, a 0.5 threshold."""
    a = rng.normal(size=(37, 5)).round(1)  # ties
    a[3, 2] = np.nan
    a[4] = -np.inf
    labels = rng.integers(0, 5, 37)
    onehot = np.eye(5)[rng.integers(0, 5, 37)]
    A = backend.asarray(a, dtype)
    pred, none = backend.argmax_correct(A)
    np.testing.assert_array_equal(to_numpy(pred), np.argmax(a, axis=1))
    assert none is None
    want = int(np.sum(np.argmax(a, axis=1) == labels))
    assert int(to_numpy(backend.argmax_correct(A, backend.asarray(labels))[1])) == want
    want = int(np.sum(np.argmax(a, axis=1) == np.argmax(onehot, axis=1)))
    assert int(to_numpy(backend.argmax_correct(A, backend.asarray(onehot, dtype))[1])) == want
    p, t = rng.uniform(size=(37, 3)), rng.integers(0, 2, (37, 3)).astype(float)
    p[0, 0] = 0.5
    want = int(np.sum((p > 0.5) == (t > 0.5)))
    got = backend.threshold_correct(backend.asarray(p, dtype), backend.asarray(t, dtype))
    assert int(to_numpy(got)) == want
