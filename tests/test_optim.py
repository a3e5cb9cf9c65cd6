"""Optimizers against a transcription of PyTorch's documented update rules.

``TorchSGD`` and ``TorchAdam`` below follow the algorithm boxes of ``torch.optim.SGD``,
``torch.optim.Adam`` and ``torch.optim.AdamW`` line by line (first momentum step ``buf = g``,
L2 decay added to the gradient for Adam, decoupled ``p -= lr * wd * p`` for AdamW, bias
corrections with ``t`` starting at 1). They share no code with gpubp, and are compared with the
reference's and every backend's update ops over several steps of fixed random gradients.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import gpubp
from gpubp import reference as ref
from gpubp.backends import to_numpy
from gpubp.optim import SGD, Adam, AdamW, make_optimizer

STEPS = 6
#: Parameter shapes in gpubp's order W^1, W^2, b^1, b^2 (widths 5 -> 33 -> 1).
SHAPES: list[tuple[int, ...]] = [(33, 5), (1, 33), (33,), (1,)]
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


# --- PyTorch's documented rules, transcribed ------------------------------------------------


class TorchSGD:
    """``torch.optim.SGD`` (foreach=False, maximize=False), as its docs state the algorithm::

    g = grad + weight_decay * p                       if weight_decay != 0
    buf = g  (t = 1)   else  momentum * buf + (1 - dampening) * g
    g = g + momentum * buf  if nesterov  else  buf    if momentum != 0
    p = p - lr * g
    """

    def __init__(self, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.nesterov = weight_decay, nesterov
        self.buf: dict[int, np.ndarray] = {}

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            d_p = g.copy()
            if self.weight_decay != 0:
                d_p = d_p + self.weight_decay * p
            if self.momentum != 0:
                if i not in self.buf:
                    self.buf[i] = d_p.copy()  # torch.clone(d_p).detach()
                else:
                    self.buf[i] = self.momentum * self.buf[i] + (1 - self.dampening) * d_p
                d_p = d_p + self.momentum * self.buf[i] if self.nesterov else self.buf[i]
            out.append(p - self.lr * d_p)
        return out


class TorchAdam:
    """``torch.optim.Adam`` (amsgrad=False) and, with ``decoupled``, ``torch.optim.AdamW``::

    Adam:  g = grad + weight_decay * p              AdamW: p = p - lr * weight_decay * p
    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    m_hat = m / (1 - beta1^t);     v_hat = v / (1 - beta2^t)       (t = 1, 2, ...)
    p = p - lr * m_hat / (sqrt(v_hat) + eps)
    """

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.t = 0
        self.m: dict[int, np.ndarray] = {}
        self.v: dict[int, np.ndarray] = {}

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> list[np.ndarray]:
        self.t += 1
        t = self.t
        out = []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if self.decoupled:
                p = p - self.lr * self.weight_decay * p
            elif self.weight_decay != 0:
                g = g + self.weight_decay * p
            m = self.m.get(i, np.zeros_like(p))
            v = self.v.get(i, np.zeros_like(p))
            self.m[i] = m = self.beta1 * m + (1 - self.beta1) * g
            self.v[i] = v = self.beta2 * v + (1 - self.beta2) * g * g
            m_hat = m / (1 - self.beta1**t)
            v_hat = v / (1 - self.beta2**t)
            out.append(p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps))
        return out

    def slots(self, n: int) -> dict[str, list[np.ndarray]]:
        return {
            "exp_avg": [self.m[i] for i in range(n)],
            "exp_avg_sq": [self.v[i] for i in range(n)],
        }


#: label -> (gpubp optimizer factory, transcription factory)
CONFIGS = {
    "sgd": (lambda: SGD(lr=0.05), lambda: TorchSGD(lr=0.05)),
    "sgd_wd": (lambda: SGD(lr=0.05, weight_decay=0.1), lambda: TorchSGD(0.05, weight_decay=0.1)),
    "momentum": (lambda: SGD(lr=0.05, momentum=0.9), lambda: TorchSGD(0.05, momentum=0.9)),
    "momentum_wd": (
        lambda: SGD(lr=0.03, momentum=0.5, weight_decay=0.2),
        lambda: TorchSGD(0.03, momentum=0.5, weight_decay=0.2),
    ),
    "nesterov": (
        lambda: SGD(lr=0.05, momentum=0.9, nesterov=True),
        lambda: TorchSGD(0.05, momentum=0.9, nesterov=True),
    ),
    "nesterov_wd": (
        lambda: SGD(lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.05),
        lambda: TorchSGD(0.02, momentum=0.8, nesterov=True, weight_decay=0.05),
    ),
    "adam": (lambda: Adam(lr=0.01), lambda: TorchAdam(0.01)),
    # eps 1e-3, not 1e-6: where g ~ -wd * p the float32 sum g + wd * p is rounding noise of
    # ~1e-8, which a tiny eps would blow up to a visible share of the step (an ill-conditioned
    # comparison that depends on the machine's rounding, not a wrong rule)
    "adam_l2": (
        lambda: Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
        lambda: TorchAdam(0.02, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
    ),
    "adam_beta1_0": (
        lambda: Adam(lr=0.01, betas=(0.0, 0.9)),
        lambda: TorchAdam(0.01, betas=(0.0, 0.9)),
    ),
    "adamw": (
        lambda: AdamW(lr=0.02, weight_decay=0.3),
        lambda: TorchAdam(0.02, weight_decay=0.3, decoupled=True),
    ),
    "adamw_default_wd": (
        lambda: AdamW(lr=0.01),
        lambda: TorchAdam(0.01, weight_decay=0.01, decoupled=True),
    ),
    "adam_decoupled_flag": (
        lambda: Adam(lr=0.02, weight_decay=0.1, decoupled=True),
        lambda: TorchAdam(0.02, weight_decay=0.1, decoupled=True),
    ),
}
LABELS = list(CONFIGS)


def gradient_sequence(rng: np.random.Generator, dtype: str) -> list[list[np.ndarray]]:
    """``STEPS`` lists of gradients (float64 values exactly representable in ``dtype``); the
    scale changes per tensor and step so Adam's normalisation matters."""
    seq = []
    for t in range(STEPS):
        grads = [rng.normal(0.0, 10.0 ** rng.uniform(-2, 1), s) for s in SHAPES]
        if t == 2:
            grads[3] = np.zeros(SHAPES[3])  # a zero gradient: momentum and m, v still move p
        seq.append([g.astype(dtype).astype(np.float64) for g in grads])
    return seq


def initial_params(rng: np.random.Generator, dtype: str) -> list[np.ndarray]:
    return [rng.normal(0.0, 1.0, s).astype(dtype).astype(np.float64) for s in SHAPES]


def expected_trajectory(label, params0, grad_seq):
    """Parameters after each step, and the transcription (for its state), in float64."""
    torch_like = CONFIGS[label][1]()
    params, traj = [p.copy() for p in params0], []
    for grads in grad_seq:
        params = torch_like.step(params, grads)
        traj.append([p.copy() for p in params])
    return traj, torch_like


def change_error(got, expected, start, dtype: str = "float64", steps: int = 1) -> float:
    """Worst error of the change from ``start``, in units of what ``dtype`` allows (<= 1 passes).

    Allowed: ``TOLERANCE[dtype]`` relative to the largest expected change, plus half a unit in
    the last place of the largest parameter for each step taken (storing ``p - lr g`` in
    ``dtype`` rounds it that much however exact the update maths is).
    """
    tol, eps = TOLERANCE[dtype], float(np.finfo(dtype).eps)
    worst = 0.0
    for g, e, s in zip(got, expected, start, strict=True):
        g = np.asarray(to_numpy(g), dtype=np.float64)
        assert g.shape == e.shape
        allowed = tol * float(np.max(np.abs(e - s))) + steps * eps * float(np.max(np.abs(e)))
        diff = float(np.max(np.abs(g - e)))
        worst = max(worst, diff / allowed if allowed > 0 else diff)
    return worst


def slot_error(got, expected) -> float:
    """Worst error of a state slot, relative to the slot's largest value over all parameters.

    Not per tensor: the backends update in the parameters' dtype, and where gradients of
    opposite signs cancel (``m`` of a one-element bias) a float32 slot ends far smaller than
    the terms that were rounded on the way to it.
    """
    scale = max(float(np.max(np.abs(e))) for e in expected)
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        g = np.asarray(to_numpy(g), dtype=np.float64)
        diff = float(np.max(np.abs(g - e)))
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def expected_slots(torch_like, opt) -> dict[str, list[np.ndarray]]:
    n = len(SHAPES)
    if isinstance(torch_like, TorchAdam):
        return torch_like.slots(n)
    if opt.slots:
        return {"momentum_buffer": [torch_like.buf[i] for i in range(n)]}
    return {}


# --- the reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
def test_reference_update_parameters_matches_torch_rules(rng, label):
    grad_seq = gradient_sequence(rng, "float64")
    params0 = initial_params(rng, "float64")
    traj, torch_like = expected_trajectory(label, params0, grad_seq)
    opt = CONFIGS[label][0]()
    state: dict = {"step": 0}
    for slot in opt.slots:
        state[slot] = [np.zeros(s) for s in SHAPES]
    params = [p.copy() for p in params0]
    for t, grads in enumerate(grad_seq):
        params, state = ref.update_parameters(params, grads, opt, state)
        assert state["step"] == t + 1
        err = change_error(params, traj[t], params0, "float64", t + 1)
        assert err <= 1, f"step {t + 1}: error {err:.3g} x the tolerance"
    for slot, expected in expected_slots(torch_like, opt).items():
        assert slot_error(state[slot], expected) <= TOLERANCE["float64"], slot


def test_transcription_is_not_trivially_equal_to_variants(rng):
    """The comparison above can fail: dropping PyTorch's first-step rule, the bias correction or
    the decoupling changes the trajectory beyond even the float32 tolerance, a hundredfold."""
    grad_seq = gradient_sequence(rng, "float64")
    params0 = initial_params(rng, "float64")
    a, _ = expected_trajectory("adamw", params0, grad_seq)
    b, _ = expected_trajectory("adam_l2", params0, grad_seq)
    assert change_error(a[-1], b[-1], params0, "float32", STEPS) > 100
    # Adam without bias correction, one step: m = 0.1 g, v = 0.001 g^2 -> p - lr * 0.1/sqrt(0.001)
    g = grad_seq[0]
    no_bc = [p - 0.01 * 0.1 * gi / (np.sqrt(0.001 * gi * gi) + 1e-8) for p, gi in zip(params0, g)]
    with_bc, _ = expected_trajectory("adam", params0, grad_seq[:1])
    assert change_error(no_bc, with_bc[0], params0, "float32", 1) > 100
    # SGD momentum with dampening (buf = m buf + (1 - m) g from step 2 on)
    damp = TorchSGD(0.05, momentum=0.9, dampening=0.9)
    p = [q.copy() for q in params0]
    for grads in grad_seq:
        p = damp.step(p, grads)
    plain, _ = expected_trajectory("momentum", params0, grad_seq)
    assert change_error(p, plain[-1], params0, "float32", STEPS) > 100


# --- every backend ---------------------------------------------------------------------------


@pytest.mark.parametrize("scratch", [False, True], ids=["alloc", "scratch"])
@pytest.mark.parametrize("label", LABELS)
def test_backend_update_parameters_matches_torch_rules(backend, dtype, rng, label, scratch):
    grad_seq = gradient_sequence(rng, dtype)
    params0 = initial_params(rng, dtype)
    traj, torch_like = expected_trajectory(label, params0, grad_seq)
    opt = CONFIGS[label][0]()
    state = opt.bind(None, backend, SHAPES, dtype)
    params = [backend.asarray(p, dtype).copy() for p in params0]
    ids = [id(p) for p in params]
    biggest = max(int(np.prod(s)) for s in SHAPES)
    kw = {"scratch": backend.zeros((2 * biggest,), dtype)} if scratch else {}
    for t, grads in enumerate(grad_seq):
        g = [backend.asarray(gi, dtype) for gi in grads]
        new_params, new_state = backend.update_parameters(params, g, opt, state, **kw)
        params = new_params
        assert new_state["step"] == t + 1
        assert all(p.dtype == np.dtype(dtype) for p in params)
        err = change_error(params, traj[t], params0, dtype, t + 1)
        assert err <= 1, f"step {t + 1}: error {err:.3g} x the tolerance"
    # the update is in place: the caller's arrays are the ones that moved
    assert [id(p) for p in params] == ids
    for slot, expected in expected_slots(torch_like, opt).items():
        assert slot_error(state[slot], expected) <= TOLERANCE[dtype], slot


@pytest.mark.parametrize("label", LABELS)
def test_backend_single_ops_match_torch_rules(backend, dtype, rng, label):
    """``sgd_update`` / ``adam_update`` called directly, one parameter at a time."""
    grad_seq = gradient_sequence(rng, dtype)
    params0 = initial_params(rng, dtype)
    traj, _ = expected_trajectory(label, params0, grad_seq)
    opt = CONFIGS[label][0]()
    params = [backend.asarray(p, dtype).copy() for p in params0]
    slots = {slot: [backend.zeros(s, dtype) for s in SHAPES] for slot in opt.slots}
    for t, grads in enumerate(grad_seq):
        for i, gi in enumerate(grads):
            g = backend.asarray(gi, dtype)
            if opt.kind == "sgd":
                buf = slots["momentum_buffer"][i] if opt.slots else None
                p, b = backend.sgd_update(
                    params[i], g, buf, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay
                )
                assert p is params[i]
                assert b is buf
            else:
                m, v = slots["exp_avg"][i], slots["exp_avg_sq"][i]
                b1, b2 = opt.betas
                p, m2, v2 = backend.adam_update(
                    params[i],
                    g,
                    m,
                    v,
                    t + 1,
                    opt.lr,
                    b1,
                    b2,
                    opt.eps,
                    opt.weight_decay,
                    opt.decoupled,
                )
                assert p is params[i] and m2 is m and v2 is v
        err = change_error(params, traj[t], params0, dtype, t + 1)
        assert err <= 1, f"step {t + 1}: error {err:.3g} x the tolerance"


@pytest.mark.parametrize("label", ["momentum", "nesterov_wd", "adam_l2", "adamw"])
def test_mlp_train_step_follows_torch_rules(backend_name, rng, label):
    """Whole train steps of an MLP in float64: backend gradients, gpubp optimizer, versus the
    reference's gradients fed to the PyTorch transcription."""
    model = gpubp.MLP(
        [4, 3, 2],
        activation="tanh",
        output="softmax",
        loss="cross_entropy",
        backend=backend_name,
        dtype="float64",
        seed=1,
    )
    x = rng.normal(size=(5, 4))
    y = rng.integers(0, 2, 5)
    opt, torch_like = CONFIGS[label][0](), CONFIGS[label][1]()
    W, b = model.get_parameters()
    start = [*W, *b]
    params = [p.copy() for p in start]
    for _ in range(STEPS):
        _, dWs, dbs = ref.gradients(
            params[:2], params[2:], x, y, "tanh", "softmax", "cross_entropy"
        )
        params = torch_like.step(params, [*dWs, *dbs])
        model.train_step(x, y, opt)
    W, b = model.get_parameters()
    assert change_error([*W, *b], params, start, "float64", STEPS) <= 100  # 1e-10 relative
    assert opt.state_dict()["step"] == STEPS


# --- argument validation ---------------------------------------------------------------------

BAD_ARGUMENTS = [
    (SGD, {"lr": 0.0}, ValueError, "lr"),
    (SGD, {"lr": -0.1}, ValueError, "lr"),
    (SGD, {"lr": float("nan")}, ValueError, "lr"),
    (SGD, {"lr": float("inf")}, ValueError, "lr"),
    (SGD, {"lr": "0.1"}, TypeError, "lr"),
    (SGD, {"lr": None}, TypeError, "lr"),
    (SGD, {"lr": True}, TypeError, "lr"),
    (SGD, {"lr": [0.1]}, TypeError, "lr"),
    (SGD, {"momentum": -0.1}, ValueError, "momentum"),
    (SGD, {"momentum": 1.0}, ValueError, "momentum"),
    (SGD, {"momentum": 1.5}, ValueError, "momentum"),
    (SGD, {"momentum": "0.9"}, TypeError, "momentum"),
    (SGD, {"nesterov": True}, ValueError, "nesterov"),
    (SGD, {"nesterov": True, "momentum": 0.0}, ValueError, "nesterov"),
    (SGD, {"nesterov": "yes", "momentum": 0.9}, TypeError, "nesterov"),
    (SGD, {"weight_decay": -1e-4}, ValueError, "weight_decay"),
    (SGD, {"weight_decay": "0"}, TypeError, "weight_decay"),
    (Adam, {"lr": 0}, ValueError, "lr"),
    (Adam, {"lr": -1e-3}, ValueError, "lr"),
    (Adam, {"lr": "fast"}, TypeError, "lr"),
    (Adam, {"betas": (1.0, 0.999)}, ValueError, "betas"),
    (Adam, {"betas": (0.9, 1.0)}, ValueError, "betas"),
    (Adam, {"betas": (-0.1, 0.999)}, ValueError, "betas"),
    (Adam, {"betas": (0.9, 1.5)}, ValueError, "betas"),
    (Adam, {"betas": (0.9,)}, ValueError, "betas"),
    (Adam, {"betas": (0.9, 0.99, 0.999)}, ValueError, "betas"),
    (Adam, {"betas": 0.9}, ValueError, "betas"),
    (Adam, {"betas": ("a", 0.999)}, TypeError, "betas"),
    (Adam, {"betas": (0.9, None)}, TypeError, "betas"),
    (Adam, {"eps": 0.0}, ValueError, "eps"),
    (Adam, {"eps": -1e-8}, ValueError, "eps"),
    (Adam, {"eps": None}, TypeError, "eps"),
    (Adam, {"weight_decay": -0.01}, ValueError, "weight_decay"),
    (Adam, {"decoupled": "yes"}, TypeError, "decoupled"),
    (AdamW, {"lr": 0.0}, ValueError, "lr"),
    (AdamW, {"betas": (0.9, 1.0)}, ValueError, "betas"),
    (AdamW, {"eps": 0}, ValueError, "eps"),
    (AdamW, {"weight_decay": -0.01}, ValueError, "weight_decay"),
    (AdamW, {"weight_decay": "0.01"}, TypeError, "weight_decay"),
]


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "argument"),
    BAD_ARGUMENTS,
    ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_are_rejected_naming_the_argument(cls, kwargs, exc, argument):
    with pytest.raises(exc, match=re.escape(argument)):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SGD, {"lr": 1}),
        (SGD, {"lr": np.float32(0.1), "momentum": 0.0, "weight_decay": 0}),
        (SGD, {"lr": 0.1, "momentum": np.float64(0.99), "nesterov": np.bool_(True)}),
        (Adam, {"betas": (0.0, 0.0), "eps": 1e-30}),
        (Adam, {"betas": [0.5, 0.5]}),
        (AdamW, {"weight_decay": 0.0}),
    ],
)
def test_edge_values_are_accepted(cls, kwargs):
    opt = cls(**kwargs)
    for key, value in kwargs.items():
        got = getattr(opt, key)
        if key == "betas":
            assert tuple(got) == tuple(float(v) for v in value)
        else:
            assert got == value
    assert repr(opt).startswith(cls.__name__ + "(")


def test_make_optimizer():
    assert make_optimizer("momentum").momentum == 0.9
    assert make_optimizer("adamw").decoupled is True
    assert make_optimizer("adam", lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("rmsprop")


# --- one optimizer, one model ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: SGD(lr=0.1, momentum=0.9), lambda: Adam(lr=0.01)], ids=["momentum", "adam"]
)
def test_optimizer_bound_to_two_models_raises(backend_name, rng, make):
    kw = {
        "activation": "tanh",
        "output": "softmax",
        "loss": "cross_entropy",
        "backend": backend_name,
        "dtype": "float64",
    }
    first = gpubp.MLP([3, 4, 2], seed=1, **kw)
    second = gpubp.MLP([3, 4, 2], seed=2, **kw)
    x = rng.normal(size=(6, 3))
    y = rng.integers(0, 2, 6)
    opt = make()
    first.train_step(x, y, opt)
    first.train_step(x, y, opt)  # the same model again is fine
    assert opt.state_dict()["step"] == 2
    before = second.get_parameters()
    with pytest.raises(ValueError, match="another model") as info:
        second.train_step(x, y, opt)
    assert "reset" in str(info.value)  # says what to do instead
    # rejected before anything changed: the second model and the optimizer's state are intact
    after = second.get_parameters()
    for u, v in zip([*before[0], *before[1]], [*after[0], *after[1]], strict=True):
        np.testing.assert_array_equal(u, v)
    assert opt.state_dict()["step"] == 2
    # after reset the optimizer starts afresh on the second model
    opt.reset()
    second.train_step(x, y, opt)
    assert opt.state_dict()["step"] == 1
    with pytest.raises(ValueError, match="another model"):
        first.train_step(x, y, opt)


# --- the checked update: every new value finite, and the right tensor named ---------------------

#: Parameter shapes W^1, W^2, W^3, b^1, b^2, b^3 of a 13-33-7-5 network: no size a multiple of
#: 32, so the last element of each falls outside the Numba kernels' 32-lane blocks.
CHECKED_SHAPES = [(33, 13), (7, 33), (5, 7), (33,), (7,), (5,)]
CHECKED_NAMES = ["W[0]", "W[1]", "W[2]", "b[0]", "b[1]", "b[2]"]


def _checked_setup(backend_name, rng, opt, edit, warm=False):
    """A fresh backend, float32 parameters and gradients in [-1, 1] changed by
    ``edit(params, grads, state)`` (NumPy arrays), and ``opt`` bound to them: ``(be, params,
    grads, snapshot)``.

    ``warm``: one step on zero parameters and gradients first, so that the Numba backend's
    proof of finiteness (which needs the maxima of the state its last write pass returned)
    decides the next step instead of its exact check; ``edit`` may then change only the
    parameters and gradients (the proof assumes nothing else writes the state).
    """
    be = type(gpubp.get_backend(backend_name))()  # its own staging arrays
    host_params = [rng.uniform(-1, 1, s).astype(np.float32) for s in CHECKED_SHAPES]
    grads = [rng.uniform(-1, 1, s).astype(np.float32) for s in CHECKED_SHAPES]
    params = [be.asarray(np.zeros(s, np.float32)) for s in CHECKED_SHAPES]
    state = opt.bind(None, be, CHECKED_SHAPES, np.float32)
    if warm:
        _apply(be, params, [be.asarray(np.zeros(s, np.float32)) for s in CHECKED_SHAPES], opt)
    host_state = {s: [np.array(to_numpy(a)) for a in state[s]] for s in opt.slots}
    edit(host_params, grads, host_state)
    for s in opt.slots:
        for a, h in zip(state[s], host_state[s], strict=True):
            if not np.array_equal(to_numpy(a), h):
                assert not warm, "a warm state must not be edited"
                a[...] = be.asarray(h)
    for p, h in zip(params, host_params, strict=True):
        p[...] = be.asarray(h)
    grads = [be.asarray(g) for g in grads]
    return be, params, grads, _checked_snapshot(params, opt)


def _checked_snapshot(params, opt):
    state = {s: [np.array(to_numpy(a)) for a in opt.state[s]] for s in opt.slots}
    return [np.array(to_numpy(p)) for p in params], state, int(opt.state["step"])


def _assert_kept(before, params, opt):
    after = _checked_snapshot(params, opt)
    for got, want in zip(after[0], before[0], strict=True):
        np.testing.assert_array_equal(got, want)
    for s in opt.slots:
        for got, want in zip(after[1][s], before[1][s], strict=True):
            np.testing.assert_array_equal(got, want)
    assert after[2] == before[2]


def _apply(be, params, grads, opt):
    be.apply_update(be.asarray(np.float32(0.5)), params, grads, opt, opt.state)
    be.synchronize()


def _adam_l2_near_sqrt_max(params, grads, state):
    # p and g below sqrt(max) = 1.84e19 each, g + 0.1 p = 1.9e19 above it: g'^2 overflows, so
    # the new v would be inf (and the new parameter finite: m / sqrt(inf) is 0)
    params[0][3, 4], grads[0][3, 4] = 1e19, 1.8e19


def _momentum_buffer_overflow(params, grads, state):
    # buf' = 0.9 * 3e38 + 1e38 overflows; lr * buf' alone would stay far below the maximum
    state["momentum_buffer"][1][2, 5], grads[1][2, 5] = 3e38, 1e38


def _adamw_shrink_overflow(params, grads, state):
    # 1 - lr wd = -1e30 is finite in float32, and so is every parameter in [-1, 1] times it;
    # this one times it is not
    params[2][4, 6] = 1e9


def _top_of_the_range(params, grads, state):
    # p - lr g = 3.4e38 + 1.2e36 rounds past float32's largest number (3.4028e38), though the
    # change is below 2^-8 of it
    params[4][6], grads[4][6] = 3.4e38, -1.2e36


# eps 1: the change of the parameter, alpha m' / eps', stays small enough for the Numba
# backend's proof to try the step, so that only the bound dropped in the mutant could stop it
@pytest.mark.parametrize(
    ("make", "edit", "warm", "name"),
    [
        (lambda: Adam(lr=1e-3, eps=1.0, weight_decay=0.1), _adam_l2_near_sqrt_max, True, "W[0]"),
        (lambda: SGD(lr=1e-3, momentum=0.9), _momentum_buffer_overflow, False, "W[1]"),
        (lambda: AdamW(lr=1e15, eps=1.0, weight_decay=1e15), _adamw_shrink_overflow, True, "W[2]"),
        (lambda: SGD(lr=1.0), _top_of_the_range, True, "b[1]"),
    ],
    ids=["adam-l2-v", "momentum-buffer", "adamw-shrink", "sgd-top-of-range"],
)
def test_checked_update_refuses_values_that_would_overflow(
    backend_name, rng, make, edit, warm, name
):
    """Finite loss and gradients, and one new value beyond float32: Adam's ``v`` (L2 decay
    takes ``g'`` past the square root of the largest number) or the momentum buffer, with the
    new parameter finite; a parameter scaled by AdamW's finite shrink; a parameter at the top
    of the range moved by a change small against it. A proof of finiteness that dropped a
    bound (on ``|g'|^2``, the shrink, the size of a change), or a check that read only the new
    parameters, would write the infinity."""
    opt = make()
    be, params, grads, before = _checked_setup(backend_name, rng, opt, edit, warm)
    with (
        pytest.raises(gpubp.NonFiniteLossError, match=re.escape(name)),
        np.errstate(over="ignore", invalid="ignore"),
    ):
        _apply(be, params, grads, opt)
    _assert_kept(before, params, opt)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("k", [0, 5], ids=lambda k: CHECKED_NAMES[k])
def test_checked_update_names_a_gradient_non_finite_in_its_last_element(
    backend_name, rng, opt_name, k
):
    """NaN only in the very last element of a gradient: every check (and the Numba backend's
    proof, which plain SGD tries first) must read that element, and blame the gradient."""
    opt = SGD(lr=0.1) if opt_name == "sgd" else Adam(lr=0.1)

    def edit(params, grads, state):
        grads[k].flat[-1] = np.nan

    be, params, grads, before = _checked_setup(backend_name, rng, opt, edit)
    grad_name = "d" + CHECKED_NAMES[k]
    with (
        pytest.raises(gpubp.NonFiniteLossError, match=re.escape(grad_name)),
        np.errstate(invalid="ignore"),
    ):
        _apply(be, params, grads, opt)
    _assert_kept(before, params, opt)


def _sum_overflows(params, grads, state):
    # dW[1] holds two values of 3e38: finite, but their float32 sum is inf
    grads[1][0, :2] = 3e38
    params[1][0, :2] = 1e38  # p - 0.1 g = 7e37: finite
    # and the new W[0] overflows: 3e38 - 0.1 * -1e39 is beyond float32
    params[0][0, 0], grads[0][0, 0] = 3e38, -3e38


def test_checked_update_names_the_parameter_when_a_gradient_sum_overflows(backend_name, rng):
    """Every gradient is finite (one's float32 sum overflows): the error names the parameter
    whose update overflows, not that gradient."""
    opt = SGD(lr=1.0)
    be, params, grads, before = _checked_setup(backend_name, rng, opt, _sum_overflows)
    with (
        pytest.raises(gpubp.NonFiniteLossError, match=r"W\[0\]") as info,
        np.errstate(over="ignore"),
    ):
        _apply(be, params, grads, opt)
    assert "gradient" not in str(info.value).split("(")[0], str(info.value)
    _assert_kept(before, params, opt)


@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam"])
def test_checked_update_applies_finite_values_whose_sum_overflows(backend_name, rng, opt_name):
    """New parameters of 3e38 and -3e38 (finite; their float32 sum is not): the step is applied,
    as the unchecked update computes it."""
    make = {
        "sgd": lambda: SGD(lr=0.1),
        "momentum": lambda: SGD(lr=0.1, momentum=0.5),
        "adam": lambda: Adam(lr=0.1),
    }[opt_name]
    opt, plain = make(), make()

    def edit(params, grads, state):
        params[2][1, :3] = 3e38

    be, params, grads, _ = _checked_setup(backend_name, rng, opt, edit)
    plain.bind(None, be, CHECKED_SHAPES, np.float32)
    copies = [p.copy() for p in params]
    with np.errstate(over="ignore"):  # NumPy's float32 sums overflow on the way
        _apply(be, params, grads, opt)
    be.update_parameters(copies, grads, plain, plain.state)
    be.synchronize()
    for got, want in zip(params, copies, strict=True):
        # (to rounding: the GPU's unchecked update is another kernel)
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-6)
    assert np.isfinite(to_numpy(params[2])).all() and int(opt.state["step"]) == 1
