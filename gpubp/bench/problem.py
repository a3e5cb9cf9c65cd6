"""The benchmarked problem: shapes, the random problem and its float64 reference, the flops, and
what one ``gpubp bench`` run covers (:class:`BenchConfig`).

Every harness (``gpubp bench``, ``benchmarks/*.py``, the pytest-benchmark suite) takes its
shapes, its step's flop count and byte count, and its reference check from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import reference as ref
from ..backends import to_numpy
from ..check import TOLERANCE, rel_error
from ..optim import SGD, Adam, Optimizer
from .timing import DEFAULT_MIN_TIME, DEFAULT_REPEATS, DEFAULT_SETTLE

#: The training step every candidate runs.
ACTIVATION, OUTPUT, LOSS = "relu", "softmax", "cross_entropy"
#: Plain SGD; small enough that hundreds of timed steps on random labels stay finite.
LR = 0.01
#: The optimizers a step can be timed with (``sgd`` is the standard step); see
#: :func:`step_optimizer`.
STEP_OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")
ADAM_LR = 1e-3


def step_optimizer(name: str, for_check: bool = False) -> Optimizer:
    """A fresh optimizer for the timed step: ``sgd`` (``lr = LR``), ``momentum`` (0.9) or
    ``adam`` (``lr = ADAM_LR``, PyTorch's other defaults).

    ``for_check``: the one a candidate's first step is checked with. For Adam that has
    ``eps = 1e-3``: the first step moves each parameter by ``lr g / (|g| + eps)``, about
    ``lr`` whatever ``|g|``, so with ``eps = 1e-8`` a gradient within rounding of 0 decides the
    sign of a whole step (a comparison of rounding noise, not of the update).
    """
    if name == "sgd":
        return SGD(lr=LR)
    if name == "momentum":
        return SGD(lr=LR, momentum=0.9)
    if name == "adam":
        return Adam(lr=ADAM_LR, eps=1e-3 if for_check else 1e-8)
    raise ValueError(f"optimizer {name!r}: expected one of {', '.join(STEP_OPTIMIZERS)}")


CPU, GPU = "cpu", "gpu"


@dataclass(frozen=True)
class BenchShape:
    """A network and its batch size on each device (``None``: not run on that device)."""

    name: str
    sizes: tuple[int, ...]
    cpu_batch: int | None
    gpu_batch: int | None

    def batch(self, device: str) -> int | None:
        return self.cpu_batch if device == CPU else self.gpu_batch


#: The standard shapes of the issue: small and large MNIST networks, a narrow deep network on a
#: huge batch (elementwise-bound), and a wide one (GEMM-bound, GPU only).
STANDARD_SHAPES: dict[str, BenchShape] = {
    s.name: s
    for s in (
        BenchShape("mnist-small", (784, 128, 10), 64, 64),
        BenchShape("mnist-mlp", (784, 1024, 1024, 10), 256, 1024),
        BenchShape("narrow-deep", (64,) * 6 + (16,), 16384, 262144),
        BenchShape("wide", (4096,) * 4, None, 8192),
    )
}

SWEEP_BATCHES: dict[str, tuple[int, ...]] = {
    CPU: (1, 4, 16, 64, 256, 1024, 4096),
    GPU: (1, 16, 256, 4096, 65536),
}
QUICK_SWEEP_BATCHES: dict[str, tuple[int, ...]] = {CPU: (1, 16, 256), GPU: (1, 256, 65536)}


@dataclass
class BenchConfig:
    """What ``gpubp bench`` runs (the command-line options).

    ``threads``: passed as ``threads=`` to every backend that takes a thread count; PyTorch
    and BLAS (the floor, the numpy backend) are limited to as many (``None``: their defaults).
    ``load``: busy processes that spin beside the whole run.
    """

    shapes: list[BenchShape] = field(default_factory=lambda: list(STANDARD_SHAPES.values()))
    backends: list[str] | None = None  # None: every available one
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    repeats: int = DEFAULT_REPEATS
    min_time: float = DEFAULT_MIN_TIME
    settle: float = DEFAULT_SETTLE
    torch: bool = True
    memory: bool = True
    sweep_shape: BenchShape | None = None
    sweep_batches: dict[str, tuple[int, ...]] = field(default_factory=lambda: SWEEP_BATCHES)
    seed: int = 0
    threads: int | None = None
    load: int = 0  # busy processes beside every candidate (--load)


def parse_shape(spec: str) -> BenchShape:
    """A standard shape by name, or ``SIZES@BATCH`` such as ``784-128-10@64`` (both devices)."""
    if spec in STANDARD_SHAPES:
        return STANDARD_SHAPES[spec]
    expected = (
        f"expected one of {', '.join(STANDARD_SHAPES)}, or layer sizes and a batch size written "
        "like 784-128-10@64"
    )
    try:
        sizes_text, batch_text = spec.split("@")
        sizes = tuple(int(n) for n in sizes_text.split("-"))
        batch = int(batch_text)
    except ValueError:
        raise ValueError(f"--shapes: {spec!r} is not a shape; {expected}") from None
    if len(sizes) < 2 or min(sizes) < 1 or batch < 1:
        raise ValueError(
            f"--shapes: {spec!r} needs at least two positive layer sizes and a positive batch; "
            f"{expected}"
        )
    if sizes[-1] < 2:
        raise ValueError(
            f"--shapes: {spec!r} has {sizes[-1]} output; the benchmark's softmax + "
            "cross-entropy needs at least 2"
        )
    return BenchShape(spec, sizes, batch, batch)


def step_flops(sizes: Sequence[int], batch: int) -> int:
    """Floating-point operations of the GEMMs in one train step.

    Per layer ``l`` (``n_in = n_{l-1}``, ``n_out = n_l``): forward ``(B, n_in) @ (n_out, n_in).T``
    and weight gradient ``(n_out, B) @ (B, n_in)``, each ``2 B n_in n_out``; the backward delta
    ``(B, n_out) @ (n_out, n_in)`` for every layer but the first (the input needs no delta).
    """
    total = 0
    for i in range(len(sizes) - 1):
        per_gemm = 2 * batch * sizes[i] * sizes[i + 1]
        total += per_gemm * (3 if i > 0 else 2)
    return total


def elementwise_bytes(sizes: Sequence[int], batch: int, itemsize: int) -> int:
    """Bytes the non-GEMM work of one train step must move at the least, if nothing is fused.

    Forward bias + activation: read and write ``z^l`` ``(B, n_l)`` for every layer; output
    softmax + cross-entropy: read ``z^L``, write ``delta^L``, read ``B`` int64 labels; backward
    Hadamard ``g * f'(a)`` for each hidden layer: read ``g`` and ``a``, write ``delta``; bias
    gradients: read every ``delta^l``; SGD: read ``p`` and ``g``, write ``p`` for every
    parameter.
    """
    B, L = batch, len(sizes) - 1
    elems = sum(2 * B * n for n in sizes[1:])  # bias + activation (the output's logits too)
    elems += 2 * B * sizes[-1]  # softmax + delta^L
    elems += sum(3 * B * n for n in sizes[1:-1])  # hidden Hadamard
    elems += sum(B * n for n in sizes[1:])  # db
    elems += sum(3 * (sizes[i] * sizes[i + 1] + sizes[i + 1]) for i in range(L))  # SGD
    return elems * itemsize + 8 * B


# --- the problem and the reference ------------------------------------------------------------


@dataclass
class Problem:
    """One train step's data, rounded to ``dtype``, and the float64 reference's answer."""

    sizes: tuple[int, ...]
    batch: int
    dtype: str
    W: list[np.ndarray]  # (n_l, n_{l-1}) in dtype
    b: list[np.ndarray]  # (n_l,) in dtype
    x: np.ndarray  # (B, n_0) in dtype
    y: np.ndarray  # (B,) int64 labels
    ref_loss: float
    ref_params: list[np.ndarray]  # W^1..W^L, b^1..b^L after one SGD step, float64


def make_problem(
    sizes: Sequence[int], batch: int, dtype: str, seed: int = 0, with_reference: bool = True
) -> Problem:
    """Random He-initialised parameters, inputs and labels, and the reference's first step.

    The reference sees exactly the values rounded to ``dtype``, so only arithmetic differs.
    With the reference, input rows that put a hidden pre-activation within rounding distance of
    the ReLU kink are redrawn (see :func:`rows_clear_of_kinks`). With ``with_reference=False``
    the reference is not run (``ref_loss`` is NaN) and every row is kept.
    """
    sizes = tuple(int(n) for n in sizes)
    rng = np.random.default_rng(seed)
    W = [
        rng.normal(0, math.sqrt(2 / sizes[i]), (sizes[i + 1], sizes[i])).astype(dtype)
        for i in range(len(sizes) - 1)
    ]
    b = [rng.normal(0, 0.1, sizes[i + 1]).astype(dtype) for i in range(len(sizes) - 1)]
    y = rng.integers(0, sizes[-1], batch).astype(np.int64)
    if not with_reference:
        x = rng.normal(0, 1, (batch, sizes[0])).astype(dtype)
        return Problem(sizes, batch, dtype, W, b, x, y, math.nan, [])
    kept: list[np.ndarray] = []
    for _ in range(100):
        more = rng.normal(0, 1, (2 * batch, sizes[0])).astype(dtype)
        kept.append(more[rows_clear_of_kinks(W, b, more)])
        if sum(len(k) for k in kept) >= batch:
            break
    else:  # pragma: no cover - needs thousands of hidden units per row
        raise RuntimeError(f"cannot draw {batch} inputs clear of the ReLU kinks for {sizes}")
    x = np.concatenate(kept)[:batch]
    f64 = [p.astype(np.float64) for p in (*W, *b)]
    L = len(W)
    loss, Wn, bn, _ = ref.train_step(
        f64[:L], f64[L:], x.astype(np.float64), y, ACTIVATION, OUTPUT, LOSS, SGD(lr=LR), {"step": 0}
    )
    return Problem(sizes, batch, dtype, W, b, x, y, float(loss), [*Wn, *bn])


def rows_clear_of_kinks(W: list[np.ndarray], b: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """``(B,)`` mask of the rows of ``x`` whose hidden pre-activations all stay off the kink.

    Where ``|z|`` is within rounding distance of 0, ``relu'(z)`` is 1 in one precision and 0 in
    another, and the delta of that unit (and every delta below it in that row) differs by its
    whole size: a true difference of precisions, not an error of either, so such rows are not
    used for checking. The distance is ``16 eps sqrt(n_in) rms(z)``, above the worst rounding of
    a length-``n_in`` dot product seen in practice.
    """
    eps = float(np.finfo(x.dtype).eps)
    a = x.astype(np.float64)
    keep = np.ones(x.shape[0], dtype=bool)
    for w, v in zip(W[:-1], b[:-1]):
        z = a @ w.astype(np.float64).T + v
        margin = 16 * eps * math.sqrt(w.shape[1]) * math.sqrt(float(np.mean(z * z)))
        keep &= (np.abs(z) > margin).all(axis=1)
        a = np.maximum(z, 0.0)
    return keep


def reference_step(problem: Problem, optimizer: str) -> tuple[float, list[np.ndarray]]:
    """The float64 reference's first step of ``problem`` with :func:`step_optimizer`
    ``(optimizer, for_check=True)`` from zero state: ``(loss, [W^1..W^L, b^1..b^L])``."""
    if optimizer == "sgd":
        return problem.ref_loss, problem.ref_params
    opt = step_optimizer(optimizer, for_check=True)
    f64 = [p.astype(np.float64) for p in (*problem.W, *problem.b)]
    state: dict[str, Any] = {"step": 0}
    for slot in opt.slots:
        state[slot] = [np.zeros_like(p) for p in f64]
    L = len(problem.W)
    x = problem.x.astype(np.float64)
    loss, Wn, bn, _ = ref.train_step(
        f64[:L], f64[L:], x, problem.y, ACTIVATION, OUTPUT, LOSS, opt, state
    )
    return float(loss), [*Wn, *bn]


def validation_error(
    problem: Problem,
    loss: float,
    params: Sequence[Any],
    reference: tuple[float, Sequence[np.ndarray]] | None = None,
) -> float:
    """Worst relative error of one step's loss and parameter changes against the reference.

    Changes, not parameters, are compared (a wrong gradient cannot hide behind the size of the
    parameters); as in :func:`gpubp.check._check_steps`, the scale of a change is floored so that
    rounding the largest parameter to ``dtype`` by one unit counts as exactly the tolerance.
    ``reference``: ``(loss, params)`` of another optimizer's step (:func:`reference_step`);
    default the problem's own SGD step.
    """
    ref_loss, ref_params = reference or (problem.ref_loss, problem.ref_params)
    rounding = float(np.finfo(problem.dtype).eps) / TOLERANCE[problem.dtype]
    worst = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    for p, p0, r in zip(params, [*problem.W, *problem.b], ref_params):
        p0 = p0.astype(np.float64)
        floor = rounding * float(np.max(np.abs(p0)))
        worst = max(worst, rel_error(to_numpy(p).astype(np.float64) - p0, r - p0, floor))
    return worst


#: Most GEMM flops the float64 reference may spend checking one candidate (a few seconds), and
#: most rows (float32 sums over more rows than this drift towards the tolerance by rounding
#: alone): a larger step is checked on a smaller batch of its own first.
VALIDATION_FLOPS, VALIDATION_ROWS = 2e10, 16384


def validation_batch(sizes: Sequence[int], batch: int) -> int:
    """The batch size a candidate is checked at: ``batch``, capped as said above."""
    per_row = step_flops(sizes, 1)
    return max(1, min(batch, VALIDATION_ROWS, int(VALIDATION_FLOPS // per_row)))
