"""Compare a backend against the float64 reference: the engine behind ``gpubp check`` and the tests.

The error measure is the worst-case relative error of a tensor,
``max|backend - reference| / max|reference|`` (the reference's own largest magnitude sets the
scale, so tiny entries do not make the ratio meaningless).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import reference as ref
from .activations import HIDDEN_ACTIVATIONS
from .backends import get_backend, to_numpy
from .losses import LOSSES
from .optim import SGD, Adam, Optimizer

#: Largest relative error accepted, per dtype, for one train step's worth of results.
TOLERANCE: dict[str, float] = {"float32": 2e-4, "float64": 1e-10}

#: The optimizers every check runs (one step each), by label.
CHECK_OPTIMIZERS: dict[str, Any] = {
    "sgd": lambda: SGD(lr=0.1),
    "sgd_nesterov_wd": lambda: SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    # eps 1e-3: with L2 decay, g + wd * p can cancel to float32 rounding noise (~1e-8), which
    # a tiny eps would amplify into a large share of the step on any correct backend
    "adam": lambda: Adam(lr=0.01, eps=1e-3, weight_decay=0.01),
    "adamw": lambda: Adam(lr=0.01, weight_decay=0.1, decoupled=True),
}


def rel_error(value: Any, expected: Any, floor: float = 0.0) -> float:
    """``max|value - expected| / max(max|expected|, floor)`` (absolute error if both are zero)."""
    v = np.asarray(to_numpy(value), dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if v.shape != e.shape:
        raise ValueError(f"shape {v.shape} does not match the reference's {e.shape}")
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, floor)
    diff = float(np.max(np.abs(v - e))) if e.size else 0.0
    return diff / scale if scale > 0 else diff


def random_problem(
    sizes: tuple[int, ...],
    batch: int,
    loss: str,
    output: str,
    rng: np.random.Generator,
    scale: float = 1.0,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Fresh float64 weights, biases, inputs ``(B, n_0)`` and targets for ``loss``."""
    weights = [
        rng.normal(0, 1 / np.sqrt(sizes[i]), (sizes[i + 1], sizes[i]))
        for i in range(len(sizes) - 1)
    ]
    biases = [rng.normal(0, 0.1, sizes[i + 1]) for i in range(len(sizes) - 1)]
    x = rng.normal(0, scale, (batch, sizes[0]))
    n = sizes[-1]
    if loss == "cross_entropy":
        y: np.ndarray = rng.integers(0, n, batch)
    elif loss == "binary_cross_entropy":
        y = (rng.random((batch, n)) < 0.5).astype(np.float64)
    else:
        y = rng.normal(0, 1, (batch, n))
        if output in ("sigmoid", "softmax"):
            y = rng.random((batch, n))
    return weights, biases, x, y


@dataclass
class CheckResult:
    """Worst relative errors of one backend configuration against the reference."""

    backend: str
    dtype: str
    sizes: tuple[int, ...]
    batch: int
    activation: str
    output: str
    loss: str
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.errors.values())

    @property
    def ok(self) -> bool:
        return self.worst <= TOLERANCE[self.dtype]


def check_configuration(
    backend: str,
    dtype: str,
    sizes: tuple[int, ...],
    batch: int,
    activation: str,
    output: str,
    loss: str,
    seed: int = 0,
    scale: float = 1.0,
    optimizers: Iterable[str] = tuple(CHECK_OPTIMIZERS),
) -> CheckResult:
    """Run every op of ``backend`` on one fresh random problem and compare with the reference.

    Checks: the forward output, the loss value, every ``dW`` and ``db``, and the parameters after
    one step of each optimizer in ``optimizers`` (the optimizer's state is warmed with one step
    first, so momentum and moment terms are exercised).
    """
    be = get_backend(backend)
    rng = np.random.default_rng(seed)
    W, b, x, y = random_problem(sizes, batch, loss, output, rng, scale)
    cast = [be.asarray(w, dtype) for w in W], [be.asarray(v, dtype) for v in b]
    xb = be.asarray(x, dtype)
    yb = be.asarray(y) if y.dtype.kind in "iu" else be.asarray(y, dtype)
    # the reference sees the parameters and data after rounding to ``dtype``, so only the
    # arithmetic is compared
    Wr = [to_numpy(w).astype(np.float64) for w in cast[0]]
    br = [to_numpy(v).astype(np.float64) for v in cast[1]]
    xr = to_numpy(xb).astype(np.float64)
    res = CheckResult(be.name, dtype, tuple(sizes), batch, activation, output, loss)

    res.errors["forward"] = rel_error(
        be.forward(cast[0], cast[1], xb, activation, output),
        ref.forward(Wr, br, xr, activation, output),
    )
    value, dWs, dbs = be.gradients(cast[0], cast[1], xb, yb, activation, output, loss)
    rvalue, rdWs, rdbs = ref.gradients(Wr, br, xr, y, activation, output, loss)
    res.errors["loss"] = abs(float(value) - rvalue) / max(abs(rvalue), 1e-30)
    res.errors["dW"] = max(rel_error(g, r) for g, r in zip(dWs, rdWs))
    res.errors["db"] = max(rel_error(g, r) for g, r in zip(dbs, rdbs))

    for label in optimizers:
        res.errors[f"step:{label}"] = _check_steps(
            be, CHECK_OPTIMIZERS[label](), dtype, Wr, br, xr, y, activation, output, loss
        )
    return res


def _check_steps(
    be: Any,
    opt: Optimizer,
    dtype: str,
    Wr: list[np.ndarray],
    br: list[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    activation: str,
    output: str,
    loss: str,
    steps: int = 2,
) -> float:
    """Worst error of the parameter change made by each of ``steps`` train steps of ``be``.

    Each step's expected result is the reference update applied to the backend's own gradients
    at the backend's own parameters (the gradients are checked separately): a float32 gradient
    that is pure rounding noise would otherwise be blown up to a full step by Adam's
    normalisation and hide the update maths behind it. Changes, not parameters, are compared,
    so a wrong update cannot hide behind the size of the parameters. Storing ``p - lr g`` in
    ``dtype`` rounds it by up to half a unit in the last place of ``p``, which can be a large
    part of a tiny change; so the scale of a change is floored such that one unit of rounding
    of the largest parameter counts as exactly the tolerance.
    """
    rounding = float(np.finfo(dtype).eps) / TOLERANCE[dtype]
    W = [be.asarray(w, dtype).copy() for w in Wr]
    b = [be.asarray(v, dtype).copy() for v in br]
    xb = be.asarray(x, dtype)
    yb = be.asarray(y) if y.dtype.kind in "iu" else be.asarray(y, dtype)
    shapes = [w.shape for w in Wr] + [v.shape for v in br]
    state = opt.bind(None, be, shapes, dtype)
    rstate: dict[str, Any] = {"step": 0}
    for slot in opt.slots:
        rstate[slot] = [np.zeros(s) for s in shapes]
    worst = 0.0
    for _ in range(steps):
        before = [to_numpy(p).astype(np.float64) for p in [*W, *b]]
        _, dWs, dbs = be.gradients(W, b, xb, yb, activation, output, loss)
        grads = [to_numpy(g).astype(np.float64) for g in [*dWs, *dbs]]
        be.train_step(W, b, xb, yb, activation, output, loss, opt, state)
        expected, rstate = ref.update_parameters(before, grads, opt, rstate)
        for p, r, p0 in zip([*W, *b], expected, before):
            floor = rounding * float(np.max(np.abs(p0)))
            worst = max(worst, rel_error(to_numpy(p).astype(np.float64) - p0, r - p0, floor))
    return worst


#: The default grid of ``gpubp check``: awkward widths, batch 1, every activation x loss pair.
DEFAULT_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((3, 1), 1),
    ((33, 257, 3), 7),
    ((64, 33, 33, 10), 65),
)


def combinations() -> list[tuple[str, str, str]]:
    """Every valid (hidden activation, output, loss) triple."""
    out = []
    for loss, outputs in LOSSES.items():
        for output, activation in itertools.product(outputs, HIDDEN_ACTIVATIONS):
            out.append((activation, output, loss))
    return out


def run_checks(
    backends: Iterable[str],
    dtypes: Iterable[str] = ("float32", "float64"),
    shapes: Iterable[tuple[tuple[int, ...], int]] = DEFAULT_SHAPES,
    seed: int = 0,
) -> list[CheckResult]:
    """:func:`check_configuration` over backends x dtypes x shapes x every valid combination."""
    results = []
    for k, (backend, dtype, (sizes, batch), (activation, output, loss)) in enumerate(
        itertools.product(list(backends), list(dtypes), list(shapes), combinations())
    ):
        if loss == "cross_entropy" and sizes[-1] < 2:
            continue  # refused by MLP: a softmax over one output is constant
        results.append(
            check_configuration(
                backend, dtype, sizes, batch, activation, output, loss, seed=seed + k
            )
        )
    return results


#: The columns of :func:`format_table`: the worst error of each over a group's configurations.
TABLE_COLUMNS = ("forward", "loss", "dW", "db", "update")


def format_table(results: Iterable[CheckResult]) -> str:
    """Worst relative error per (backend, dtype, output+loss) over activations and shapes, the
    update column over every optimizer; ``ok`` or ``FAIL`` per row."""
    groups: dict[tuple[str, str, str], dict[str, float]] = collections.defaultdict(dict)
    ok: dict[tuple[str, str, str], bool] = collections.defaultdict(lambda: True)
    for r in results:
        key = (r.backend, r.dtype, f"{r.output}+{r.loss}")
        update = max(v for k, v in r.errors.items() if k.startswith("step:"))
        values = {c: r.errors[c] for c in TABLE_COLUMNS[:-1]} | {"update": update}
        for col, val in values.items():
            groups[key][col] = max(groups[key].get(col, 0.0), val)
        ok[key] = ok[key] and r.ok
    header = f"{'backend':8} {'dtype':8} {'output+loss':30} " + " ".join(
        f"{c:>9}" for c in TABLE_COLUMNS
    )
    lines = [
        "worst relative error against the reference (over hidden activations and shapes)",
        header,
        "-" * len(header),
    ]
    for key in sorted(groups):
        cells = " ".join(f"{groups[key][c]:9.1e}" for c in TABLE_COLUMNS)
        lines.append(f"{key[0]:8} {key[1]:8} {key[2]:30} {cells}  {'ok' if ok[key] else 'FAIL'}")
    return "\n".join(lines)


def format_failures(results: Iterable[CheckResult]) -> str:
    """One line per configuration out of tolerance: where, and each error above it."""
    lines = []
    for r in results:
        if r.ok:
            continue
        errs = ", ".join(f"{k}={v:.2e}" for k, v in r.errors.items() if v > TOLERANCE[r.dtype])
        lines.append(
            f"  {r.backend} {r.dtype} sizes={list(r.sizes)} batch={r.batch} "
            f"{r.activation}/{r.output}/{r.loss}: {errs}"
        )
    return "\n".join(lines)
