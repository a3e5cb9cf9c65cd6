"""Optimizers: hyper-parameters and state. The update maths lives in the backends.

Parameters are always visited in the order ``W^1..W^L, b^1..b^L``. Weight decay applies to
every parameter, biases included, exactly as it does in ``torch.optim`` when a model's
``parameters()`` are passed in.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .schedules import Schedule

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]

#: The owner of state bound with ``owner=None``: parameters the caller keeps itself.
_UNOWNED = object()


def _check_number(
    name: str,
    value: object,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    bad_high = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        rng = f"{lo}{low}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


class AdamScalars(NamedTuple):
    """Adam's per-step scalars, derived once in float64 for every backend (NumPy, Numba, CUDA).

    The bias corrections are folded into two scalars, ``p' = p shrink - alpha m' /
    (sqrt(v') + eps_hat)`` with ``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)`` and
    ``eps_hat = eps sqrt(1 - b2^t)`` (``lr / (1 - b1^t)`` alone can overflow where the step
    does not); ``l2 = wd, shrink = 1`` (Adam) or ``l2 = 0, shrink = 1 - lr wd`` (AdamW).
    """

    b1: float
    omb1: float
    b2: float
    omb2: float
    eps_hat: float
    alpha: float
    shrink: float
    l2: float


def adam_scalars(
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> AdamScalars:
    """The scalars of Adam / AdamW step ``step`` (from 1), from :meth:`Adam.op_arguments`."""
    root_bc2 = math.sqrt(1.0 - beta2**step)
    return AdamScalars(
        b1=beta1,
        omb1=1.0 - beta1,
        b2=beta2,
        omb2=1.0 - beta2,
        eps_hat=eps * root_bc2,
        alpha=lr * root_bc2 / (1.0 - beta1**step),
        shrink=1.0 - lr * weight_decay if decoupled else 1.0,
        l2=0.0 if decoupled else weight_decay,
    )


class Optimizer:
    """Base class: hyper-parameters, the per-parameter state, and which model owns it.

    ``state`` is ``None`` until the first step, then a dict with ``"step"`` (steps taken) and
    one list of backend arrays per slot (see :attr:`slots`), each list in parameter order.
    """

    kind: str = ""
    #: The backend op (of :mod:`gpubp.reference` and every backend) that applies this rule to
    #: one parameter, and the state slots it takes after ``(param, grad)``, in its order.
    op: str = ""
    op_slots: tuple[str, ...] = ()
    lr: float
    weight_decay: float

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self._owner: Callable[[], object] | None = None
        #: the backend the state lives on (its ``to_numpy`` copies the state out)
        self._backend: Any = None
        self._shapes: list[tuple[int, ...]] = []
        #: the schedule ``lr`` follows and its global step (:meth:`follow`), or ``None``
        self.schedule: Schedule | None = None
        self.schedule_step: int | None = None

    def follow(self, schedule: Schedule, step: int) -> None:
        """Set ``lr`` to ``schedule``'s rate of global step ``step`` (0 first), and keep both, so
        that a backend may compute the rate itself (the CUDA step does, on the device, where the
        schedule is a formula and ``lr`` is still that rate)."""
        self.lr = schedule.at(step)
        self.schedule, self.schedule_step = schedule, int(step)

    @property
    def slots(self) -> tuple[str, ...]:
        """Names of the per-parameter state arrays this optimizer keeps."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """The settings, as plain Python values (saved in checkpoints)."""
        raise NotImplementedError

    @property
    def variant(self) -> tuple[bool, ...]:
        """The switches that change which update is computed, not only its numbers (a fused
        update kernel is chosen by them)."""
        raise NotImplementedError

    def op_arguments(self, step: int) -> tuple[Any, ...]:
        """The arguments of :attr:`op` after the arrays, for step ``step`` (1 first)."""
        raise NotImplementedError

    def update(
        self,
        ops: Any,
        params: list[Any],
        grads: list[Any],
        state: dict[str, Any],
        *,
        outs: list[tuple[Any, ...]] | None = None,
        **kw: Any,
    ) -> tuple[list[Any], dict[str, Any]]:
        """One step of this rule on every parameter: ``ops.<op>(param, grad, *slots, *args)``.

        ``ops`` is a backend (which updates in place) or :mod:`gpubp.reference` (which returns
        new arrays); ``kw`` goes to every op call (a backend's ``scratch=``), and ``outs[i]``,
        if given, as ``out=`` to parameter ``i``'s (a backend then writes the new parameter and
        slots there and leaves the inputs unchanged). ``params`` and
        ``grads`` are in the order ``W^1..W^L, b^1..b^L``. Returns the op's parameters and a new
        state dict (``"step"`` incremented, each slot list rebuilt from the op's results); the
        given ``state`` is not changed.
        """
        step = int(state["step"]) + 1
        args = self.op_arguments(step)
        rule = getattr(ops, self.op)
        columns = [state.get(slot) or [None] * len(params) for slot in self.op_slots]
        per = [{} for _ in params] if outs is None else [{"out": o} for o in outs]
        results = [
            rule(p, g, *s, *args, **kw, **o) for p, g, o, *s in zip(params, grads, per, *columns)
        ]
        new_state: dict[str, Any] = {"step": step}
        for k, slot in enumerate(self.op_slots):
            if slot in self.slots:
                new_state[slot] = [r[k + 1] for r in results]
        return [r[0] for r in results], new_state

    def bind(
        self, owner: object, backend: Any, shapes: list[tuple[int, ...]], dtype: Any
    ) -> dict[str, Any]:
        """Return the state for ``owner``'s parameters, creating zeroed slots on first use.

        One optimizer serves one model: using it with a second model is an error, because its
        momentum and moment estimates belong to the first. ``owner`` is that model, or None
        where the caller keeps the parameters itself (then only their shapes are checked).
        """
        owner = _UNOWNED if owner is None else owner
        if self._owner is None or self.state is None:
            try:  # a weak reference: the optimizer must not keep a discarded model alive
                self._owner = weakref.ref(owner)
            except TypeError:  # objects without weakref support are held strongly
                self._owner = lambda: owner
            self._shapes = [tuple(s) for s in shapes]
            self._backend = backend
            self.state = {"step": 0}
            for slot in self.slots:
                self.state[slot] = [backend.zeros(s, dtype) for s in shapes]
        elif self._owner() is not owner or self._shapes != [tuple(s) for s in shapes]:
            raise ValueError(
                "optimizer already holds state for another model (or for a model that no "
                "longer exists); create one optimizer per model, or call optimizer.reset() to "
                "start afresh"
            )
        return self.state

    def reset(self) -> None:
        """Forget all state (step count and slots); the next step starts afresh."""
        self.state = None
        self._owner = None
        self._shapes = []

    def load_state_dict(
        self,
        saved: dict[str, Any],
        owner: object,
        backend: Any,
        shapes: list[tuple[int, ...]],
        dtype: Any,
        *,
        check_values: bool = True,
    ) -> None:
        """Restore state written by :meth:`state_dict` for ``owner``'s parameters.

        Everything is checked (step count ``<= 2**53``, every slot and every shape, and with
        ``check_values`` every value finite and ``exp_avg_sq >= 0``, the invariants each update
        relies on) before anything is replaced, so a bad ``saved`` leaves this optimizer as it
        was. ``check_values=False`` is for tests that load out-of-range state on purpose.
        """
        step = saved.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step:
            raise ValueError(f"saved optimizer state: step must be an int >= 0, got {step!r:.80}")
        if step > 2**53:  # beta ** step must stay a float: b2 ** 10**400 overflows
            raise ValueError("saved optimizer state: step must be at most 2**53")
        arrays: dict[str, list[np.ndarray]] = {}
        if step > 0:
            for slot in self.slots:
                got = saved.get(slot)
                if not isinstance(got, (list, tuple)) or len(got) != len(shapes):
                    raise ValueError(
                        f"saved optimizer state: slot {slot!r} must hold {len(shapes)} arrays "
                        f"(one per parameter) for {type(self).__name__}"
                    )
                for i, (arr, shape) in enumerate(zip(got, shapes)):
                    if tuple(np.shape(arr)) != tuple(shape):
                        raise ValueError(
                            f"saved optimizer state: {slot}[{i}] has shape {np.shape(arr)}; "
                            f"expected {tuple(shape)}"
                        )
                arrays[slot] = [
                    _checked_slot(slot, i, a) if check_values else np.asarray(a)
                    for i, a in enumerate(got)
                ]
        self.reset()
        if step == 0:
            return
        state = self.bind(owner, backend, shapes, dtype)
        state["step"] = int(step)
        for slot, values in arrays.items():
            state[slot] = [backend.asarray(a, dtype).copy() for a in values]

    def state_dict(self) -> dict[str, Any]:
        """State as NumPy copies, ``{"step": int, slot: [arrays]}`` (no slots before a step)."""
        if self.state is None:
            return {"step": 0}
        out: dict[str, Any] = {"step": int(self.state["step"])}
        for slot in self.slots:
            out[slot] = [np.array(self._backend.to_numpy(a)) for a in self.state[slot]]
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"


def _checked_slot(slot: str, i: int, value: Any) -> np.ndarray:
    """A saved state array as NumPy, refused unless real and finite, and for ``exp_avg_sq`` (a
    mean of squares, whose square root the update takes) ``>= 0``: what every update assumes."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu" or not np.isfinite(arr).all():
        raise ValueError(f"saved optimizer state: {slot}[{i}] must hold finite real numbers")
    if slot == "exp_avg_sq" and not (arr >= 0).all():
        raise ValueError(
            f"saved optimizer state: {slot}[{i}] holds negative values; a mean of squares is >= 0"
        )
    return arr


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and weight decay.

    Matches ``torch.optim.SGD(lr, momentum, dampening=0, weight_decay, nesterov)``::

        g = dC/dp + weight_decay * p
        buf = momentum * buf + g           (buf starts at zero)
        g = g + momentum * buf  if nesterov else  buf      (when momentum > 0)
        p = p - lr * g
    """

    kind = "sgd"
    op = "sgd_update"
    op_slots = ("momentum_buffer",)  # None for each parameter without momentum

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.lr = _check_number("lr", lr, low=0.0, low_open=True)
        self.momentum = _check_number("momentum", momentum, low=0.0, high=1.0)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0; pass momentum=0.9, say")
        self.nesterov = bool(nesterov)
        self.weight_decay = _check_number("weight_decay", weight_decay, low=0.0)

    @property
    def slots(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    @property
    def variant(self) -> tuple[bool, ...]:
        return (self.momentum != 0, self.nesterov)

    def op_arguments(self, step: int) -> tuple[Any, ...]:
        return (self.lr, self.momentum, self.nesterov, self.weight_decay)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
        }


class Adam(Optimizer):
    """Adam, or AdamW with ``decoupled=True``; matches ``torch.optim.Adam`` / ``AdamW``.

    With ``t`` the step number (1 first)::

        Adam:  g = dC/dp + weight_decay * p         AdamW: p = p * (1 - lr * weight_decay)
        m = beta1 m + (1 - beta1) g                  v = beta2 v + (1 - beta2) g^2
        p = p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    """

    kind = "adam"
    op = "adam_update"
    op_slots = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        super().__init__()
        self.lr = _check_number("lr", lr, low=0.0, low_open=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1 = _check_number("betas[0]", betas[0], low=0.0, high=1.0)
        b2 = _check_number("betas[1]", betas[1], low=0.0, high=1.0)
        self.betas = (b1, b2)
        self.eps = _check_number("eps", eps, low=0.0, low_open=True)
        self.weight_decay = _check_number("weight_decay", weight_decay, low=0.0)
        if not isinstance(decoupled, (bool, np.bool_)):
            raise TypeError(f"decoupled must be True or False, got {decoupled!r}")
        self.decoupled = bool(decoupled)

    @property
    def slots(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    @property
    def variant(self) -> tuple[bool, ...]:
        return (self.decoupled,)

    def op_arguments(self, step: int) -> tuple[Any, ...]:
        b1, b2 = self.betas
        return (step, self.lr, b1, b2, self.eps, self.weight_decay, self.decoupled)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "decoupled": self.decoupled,
        }


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay (default 0.01, as in PyTorch)."""

    def __init__(
        self,
        lr: float = 0.001,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(lr, betas, eps, weight_decay, decoupled=True)

    def hyperparameters(self) -> dict[str, Any]:
        h = super().hyperparameters()
        del h["decoupled"]
        return h


def make_optimizer(name: str, **kwargs: Any) -> Optimizer:
    """Optimizer from its name: ``sgd``, ``momentum`` (SGD with 0.9), ``adam`` or ``adamw``."""
    if name == "sgd":
        return SGD(**kwargs)
    if name == "momentum":
        kwargs.setdefault("momentum", 0.9)
        return SGD(**kwargs)
    if name == "adam":
        return Adam(**kwargs)
    if name == "adamw":
        return AdamW(**kwargs)
    raise ValueError(
        f"optimizer={name!r} is not supported; expected one of sgd, momentum, adam, adamw"
    )
