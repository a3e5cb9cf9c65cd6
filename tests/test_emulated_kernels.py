"""Every CUDA kernel instantiation, run on the emulated device and judged by the float64 reference.

One test body per kernel family, parametrised over :func:`catalogue.name_expressions` of that
family, so a new instantiation is tested as soon as the catalogue names it (and
:func:`test_every_instantiation_is_tested` fails if its kernel template has no check here).
Device memory is plain NumPy memory: every array sits inside a larger buffer between guard bytes
(checked after every launch, so an out-of-bounds store fails the test), either 16-byte aligned
(the vector paths run) or offset by one element (their scalar fallbacks run).

Every case runs once per launch shape in :data:`SHAPES` and block order in :data:`ORDERS`, each
time on fresh copies of the same inputs; the outputs must be bit-identical across all of them
(the kernels promise a fixed reduction order and grid-stride loops, whatever the block size), and
the first is compared with :mod:`gpubp.reference`. The fixed-order sums (loss_partial and
finalize_loss, bias_grad_finish) must also equal, bit for bit, the order common.cuh's
``fixed_sum`` documents (:func:`fixed_sum`).

Tolerance (:func:`assert_close`): normwise relative error, ``max |got - ref| / max |ref|`` over
the finite entries of an output, at most 2e-5 for float32 and 1e-12 for float64; entries the
reference gives as NaN or infinite must be exactly as non-finite in the kernel's output (NaN
where NaN, the same infinity where infinite).

The module skips (with the reason) where no C++ compiler is installed, unless
``GPUBP_REQUIRE_EMULATOR=1`` (CI), where it fails.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytest

from cudaemu import kernels as emu
from gpubp import optim
from gpubp import reference as ref
from gpubp.activations import ACTIVATION_IDS
from gpubp.backends.cuda import catalogue as ck
from gpubp.schedules import Schedule

_WHY = emu.compiler_missing()
if _WHY is not None:
    if os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1":
        pytest.fail(f"GPUBP_REQUIRE_EMULATOR=1, but {_WHY}", pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

#: Launch shapes ``(blocks, threads)``: one block, warps of one block, the backend's block size,
#: and a block size that is not a power of two.
SHAPES: tuple[tuple[int, int], ...] = ((1, 64), (3, 32), (2, 256), (7, 96))
ORDERS: tuple[str, ...] = ("forward", "reverse", "shuffled")
#: Every shape in every block order (one block has one order).
COMBOS: tuple[tuple[int, int, str], ...] = tuple(
    (g, t, o) for g, t in SHAPES for o in (ORDERS if g > 1 else ORDERS[:1])
)
TOL: dict[np.dtype, float] = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}
ACT_NAMES: dict[int, str] = {v: k for k, v in ACTIVATION_IDS.items()}
NULL = np.uint64(0)
i32, i64 = np.int32, np.int64

# --- names, modules and launches --------------------------------------------------------------

_NAME = re.compile(r"gpubp::(\w+)(?:<(.+)>)?")


def parse(name: str) -> tuple[str, np.dtype | None, tuple[int, ...]]:
    """``"gpubp::mse_loss<float, 5, 1>"`` -> ``("mse_loss", float32, (5, 1))``."""
    m = _NAME.fullmatch(name)
    assert m is not None, f"{name!r} is not a gpubp kernel name"
    args = [a.strip() for a in m[2].split(",")] if m[2] else []
    dtype = None
    if args and args[0] in ("float", "double"):
        dtype = np.dtype(np.float32 if args.pop(0) == "float" else np.float64)
    return m[1], dtype, tuple(int(a) for a in args)


def _id(name: str) -> str:
    return re.sub(r"\W+", "-", name.removeprefix("gpubp::")).strip("-")


@functools.cache
def module(family: str) -> emu.Module:
    return emu.Module(ck.source(family), ck.name_expressions(family))


def kernel(name: str) -> emu.Function:
    return module(ck.family_of(name)).get_function(name)


# --- device memory with guards ----------------------------------------------------------------

#: Guard bytes: all ones is NaN as float32 and float64 (and -1 as an integer), so a read past the
#: end of an array brings a NaN into the result, and a store there changes a guard.
GUARD_BYTE = 0xFF


class Memory:
    """Arrays for one launch, each inside a larger buffer filled with guard bytes.

    ``put(values, misalign=False)`` returns a C-contiguous view whose data is 16-byte aligned,
    or one element past a 16-byte boundary (``misalign=True``); at least 16 bytes before and
    128 after it are guards, checked by :meth:`assert_guards` (:meth:`broken_guards`).
    """

    def __init__(self) -> None:
        self._placed: list[tuple[np.ndarray, int, int]] = []

    def put(self, values: Any, misalign: bool = False, dtype: Any = None) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=dtype)
        item = values.dtype.itemsize
        extra = 64 // item
        buf = np.empty(values.size + 3 * extra, dtype=values.dtype)
        buf.view(np.uint8)[:] = GUARD_BYTE
        start = extra // 2
        while (buf.ctypes.data + start * item) % 16:
            start += 1
        start += int(misalign)
        view = buf[start : start + values.size].reshape(values.shape)
        view[...] = values
        assert (view.ctypes.data % 16 == 0) != misalign
        self._placed.append((buf, start * item, (start + values.size) * item))
        return view

    def broken_guards(self) -> list[int]:
        """Indices of the arrays whose guards were overwritten."""
        broken = []
        for k, (buf, lo, hi) in enumerate(self._placed):
            raw = buf.view(np.uint8)
            if not (np.all(raw[:lo] == GUARD_BYTE) and np.all(raw[hi:] == GUARD_BYTE)):
                broken.append(k)
        return broken

    def assert_guards(self, where: str) -> None:
        broken = self.broken_guards()
        assert not broken, f"{where}: a store outside array(s) {broken}"


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit (NaN payloads and the sign of zero included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    same = a.dtype == b.dtype and a.shape == b.shape
    return same and np.array_equal(a.view(np.uint8), b.view(np.uint8))


Launch = Callable[[str, Sequence[Any]], None]


def run_everywhere(
    body: Callable[[Launch, Memory], Sequence[np.ndarray]],
    what: str,
    combos: Iterable[tuple[int, int, str]] = COMBOS,
) -> list[np.ndarray]:
    """Run ``body(launch, mem)`` once per launch shape and block order, on fresh memory.

    ``body`` places its inputs in ``mem``, launches its kernels with ``launch(name, args)`` and
    returns its outputs; they must be bit-identical in every run and leave every guard intact.
    Returns copies of the outputs of the first run.
    """
    first: list[np.ndarray] | None = None
    first_where = ""
    for grid, block, order in combos:
        where = f"{what}, grid={grid} block={block} order={order}"
        mem = Memory()

        def launch(
            name: str, args: Sequence[Any], grid: int = grid, block: int = block, order: str = order
        ) -> None:
            kernel(name)((grid,), (block,), tuple(args), order=order)

        outs = [np.array(o, copy=True) for o in body(launch, mem)]
        mem.assert_guards(where)
        if first is None:
            first, first_where = outs, where
            continue
        for k, (a, b) in enumerate(zip(first, outs)):
            assert bits_equal(a, b), (
                f"output {k} is not bit-identical: {first_where} gave\n{a!r}\n{where} gave\n{b!r}"
            )
    assert first is not None
    return first


def assert_close(got: np.ndarray, want: Any, what: str) -> None:
    """Normwise relative error over the finite entries, non-finite entries exactly as in want."""
    tol = TOL[np.asarray(got).dtype] if np.asarray(got).dtype in TOL else TOL[np.dtype(np.float64)]
    g = np.asarray(got, dtype=np.float64)
    w = np.asarray(want, dtype=np.float64)
    assert g.shape == w.shape, f"{what}: shape {g.shape}, expected {w.shape}"
    nonfinite = ~np.isfinite(w)
    assert np.array_equal(nonfinite, ~np.isfinite(g)), (
        f"{what}: non-finite entries differ from the reference:\n{g!r}\n{w!r}"
    )
    assert np.array_equal(g[nonfinite], w[nonfinite], equal_nan=True), (
        f"{what}: non-finite entries differ from the reference:\n{g!r}\n{w!r}"
    )
    if nonfinite.all():
        return
    scale = max(float(np.max(np.abs(w[~nonfinite]))), float(np.finfo(np.float64).tiny))
    err = float(np.max(np.abs(g[~nonfinite] - w[~nonfinite]))) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}\ngot  {g!r}\nwant {w!r}"


def status_word(bad: bool = False) -> np.ndarray:
    s = np.zeros(ck.STATUS_SLOTS, dtype=np.int32)
    s[ck.STATUS_BAD] = int(bad)
    return s


def expect_status(status: np.ndarray, bad: bool, what: str) -> None:
    want = status_word(bad)
    assert np.array_equal(status, want), f"{what}: status {status}, expected {want}"


def scalar(dtype: np.dtype, value: float) -> np.generic:
    return dtype.type(value)


POISONS: tuple[float, ...] = (np.nan, np.inf, -np.inf)

# --- bias_activation.cu -----------------------------------------------------------------------

#: (rows, n, arrays offset by one element). n = 8 is a multiple of every vector width: aligned,
#: it takes the 16-byte path; with z and b (or b alone) offset, the scalar fallback.
ELEMENTWISE_CASES: tuple[tuple[int, int, frozenset[str]], ...] = (
    (5, 1, frozenset()),
    (4, 3, frozenset({"z", "b"})),
    (7, 45, frozenset()),
    (6, 8, frozenset()),
    (6, 8, frozenset({"z", "b"})),
    (6, 8, frozenset({"b"})),
)


def _bias_activation_case(
    name: str, dtype: np.dtype, activation: str, z: np.ndarray, b: np.ndarray, off: frozenset[str]
) -> None:
    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        zd, bd = mem.put(z, "z" in off), mem.put(b, "b" in off)
        st = mem.put(status_word())
        launch(name, (zd, bd, i64(z.shape[0]), i32(z.shape[1]), st))
        return [zd, st]

    what = f"{name} {z.shape} offset={sorted(off)}"
    got, st = run_everywhere(body, what)
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref.activate(z.astype(np.float64) + b.astype(np.float64), activation)
        nan_in = np.isnan(z + b).any()  # the pre-activation, in the dtype, as the kernel has it
    assert_close(got, want, what)
    # flagged where the output is not finite, and where the pre-activation is NaN even if the
    # activation hides it (ReLU: NaN > 0 is false, so NaN becomes 0, in the reference too)
    expect_status(st, bool(nan_in) or not np.isfinite(want).all(), what)


def check_bias_activation(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    template = parse(name)[0]
    activation = "softmax" if template == "bias_softmax" else ACT_NAMES[params[0]]
    for rows, n, off in ELEMENTWISE_CASES:
        z = rng.normal(0.0, 3.0, (rows, n)).astype(dtype)
        b = rng.normal(0.0, 1.0, n).astype(dtype)
        _bias_activation_case(name, dtype, activation, z, b, off)
    # NaN and infinities: STATUS_BAD exactly where the reference's output is not finite or the
    # pre-activation is NaN
    for poison in POISONS:
        z = rng.normal(0.0, 3.0, (3, 8)).astype(dtype)
        b = rng.normal(0.0, 1.0, 8).astype(dtype)
        z[1, 5] = poison
        _bias_activation_case(name, dtype, activation, z, b, frozenset())


# --- hidden_delta.cu --------------------------------------------------------------------------


def _hidden_delta_case(
    name: str, activation: str, g: np.ndarray, a: np.ndarray, off: frozenset[str]
) -> None:
    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        gd, ad = mem.put(g, "g" in off), mem.put(a, "a" in off)
        st = mem.put(status_word())
        launch(name, (gd, ad, i64(g.size), st))
        return [gd, st]

    what = f"{name} {g.shape} offset={sorted(off)}"
    got, st = run_everywhere(body, what)
    with np.errstate(invalid="ignore"):
        want = g.astype(np.float64) * ref.derivative_from_output(a, activation)
    assert_close(got, want, what)
    expect_status(st, not np.isfinite(want).all(), what)


def check_hidden_delta(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    activation = ACT_NAMES[params[0]]
    # counts 5, 12, 315 (vector path and a scalar tail), 48 (vectors only), each also offset
    cases = [(r, n, frozenset(o)) for r, n, o in ELEMENTWISE_CASES]
    cases[5] = (6, 8, frozenset({"a"}))
    for rows, n, off in cases:
        g = rng.normal(0.0, 1.0, (rows, n)).astype(dtype)
        a = ref.activate(rng.normal(0.0, 2.0, (rows, n)), activation).astype(dtype)
        _hidden_delta_case(name, activation, g, a, off)
    for poison in POISONS:
        for where in ("g", "a"):
            g = rng.normal(0.0, 1.0, (3, 8)).astype(dtype)
            a = ref.activate(rng.normal(0.0, 2.0, (3, 8)), activation).astype(dtype)
            (g if where == "g" else a)[2, 7] = poison
            _hidden_delta_case(name, activation, g, a, frozenset())


# --- output_layer.cu --------------------------------------------------------------------------

#: (rows, n, bias folded into z, arrays offset by one element). Every shape has fewer rows than
#: warps in some launch shape (21 warps at (7, 96)), and more rows than warps at (1, 64).
OUTPUT_CASES: tuple[tuple[int, int, bool, frozenset[str]], ...] = (
    (2, 1, False, frozenset()),
    (5, 3, True, frozenset({"z"})),
    (9, 45, False, frozenset({"z", "b", "y", "labels"})),
    (4, 8, True, frozenset()),
)


def _output_of(template: str, params: tuple[int, ...]) -> tuple[str, str, bool]:
    """(output activation, loss, labels) of an output-layer kernel."""
    if template == "softmax_cross_entropy":
        return "softmax", "cross_entropy", params[0] == ck.TARGET_LABELS
    if template == "bce_loss":
        return "sigmoid", "binary_cross_entropy", params[0] == ck.TARGET_LABELS
    if template == "poisson_loss":
        return "exp", "poisson", params[0] == ck.TARGET_LABELS
    assert template == "mse_loss", template
    return ACT_NAMES[params[0]], "mse", params[1] == ck.TARGET_LABELS


def _dense_targets(loss: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    if loss == "cross_entropy":  # soft labels: rows of a probability distribution
        y = rng.random((rows, n)) + 0.05
        return y / y.sum(axis=1, keepdims=True)
    if loss == "binary_cross_entropy":
        return rng.random((rows, n))
    if loss == "poisson":  # counts, zeros among them (0 log 0 = 0)
        return rng.poisson(1.5, (rows, n)).astype(np.float64)
    return rng.normal(0.0, 1.0, (rows, n))


def _output_case(
    name: str,
    z: np.ndarray,
    b: np.ndarray,
    fold: bool,
    y: np.ndarray | None,
    labels: np.ndarray | None,
    off: frozenset[str],
) -> None:
    template, dtype, params = parse(name)
    assert dtype is not None
    output, loss, _ = _output_of(template, params)
    rows, n = z.shape
    # folded: b is null and z already holds z + b (rounded to the dtype, as the GEMM leaves it)
    z_in = (z + b).astype(dtype) if fold else z

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        zd = mem.put(z_in, "z" in off)
        bd = NULL if fold else mem.put(b, "b" in off)
        yd = NULL if y is None else mem.put(y, "y" in off)
        ld = NULL if labels is None else mem.put(labels, "labels" in off)
        rl = mem.put(np.full(rows, -1.0, dtype))
        st = mem.put(status_word())
        args = (zd, bd, yd, ld, i64(rows), i32(n), scalar(dtype, 1.0 / rows), rl, st)
        launch(name, args)
        return [zd, rl, st]

    what = f"{name} {z.shape} fold={fold} offset={sorted(off)}"
    delta, row_loss, st = run_everywhere(body, what)
    v = z_in.astype(np.float64) if fold else z.astype(np.float64) + b.astype(np.float64)
    if labels is not None:
        Y = np.zeros((rows, n))
        Y[np.arange(rows), labels] = 1.0
    else:
        assert y is not None
        Y = y.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        want, _ = ref.output_delta(v, Y, output, loss)
        # per-row losses: the reference's mean loss of a batch of one row (MSE halves it)
        per_row = [
            ref.output_delta(v[r : r + 1], Y[r : r + 1], output, loss)[1] for r in range(rows)
        ]
    want_rows = np.array(per_row) * (2.0 if loss == "mse" else 1.0)
    assert_close(delta, want, f"{what}: delta")
    if np.isfinite(want).all() and np.isfinite(v).all():
        assert_close(row_loss, want_rows, f"{what}: row losses")
    else:  # a poisoned row: which non-finite value the loss becomes is not the contract
        assert np.array_equal(np.isfinite(row_loss), np.isfinite(want_rows)), what
    expect_status(st, not np.isfinite(want).all(), what)


def check_output_kernel(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    template = parse(name)[0]
    _, loss, labels = _output_of(template, params)
    for rows, n, fold, off in OUTPUT_CASES:
        if loss == "cross_entropy" and n == 1:
            n = 2  # cross-entropy needs two classes (the reference refuses one)
        z = rng.normal(0.0, 2.0, (rows, n)).astype(dtype)
        b = rng.normal(0.0, 1.0, n).astype(dtype)
        y = None if labels else _dense_targets(loss, rows, n, rng).astype(dtype)
        lab = rng.integers(0, n, rows).astype(np.int64) if labels else None
        _output_case(name, z, b, fold, y, lab, off)
    # NaN and infinities in z (and NaN in dense targets): STATUS_BAD where the reference's delta
    # is not finite (ReLU maps NaN to 0, exactly as the reference does)
    rows, n = 3, 5
    poisoned = [("z", p) for p in POISONS] + ([] if labels else [("y", np.nan)])
    for where, poison in poisoned:
        z = rng.normal(0.0, 2.0, (rows, n)).astype(dtype)
        b = rng.normal(0.0, 1.0, n).astype(dtype)
        y = None if labels else _dense_targets(loss, rows, n, rng).astype(dtype)
        lab = rng.integers(0, n, rows).astype(np.int64) if labels else None
        (z if where == "z" else y)[1, 3] = poison  # type: ignore[index]
        _output_case(name, z, b, False, y, lab, frozenset())


#: Slots of common.cuh's ``fixed_sum`` (checked against the header by
#: :func:`test_fixed_sum_slots_match_the_header`).
SUM_SLOTS = 1024


def fixed_sum(values: Any) -> float:
    """The total of ``values`` in the order common.cuh's ``fixed_sum`` promises, which depends
    on no launch shape: slot ``k`` of SUM_SLOTS adds the items ``k, k + SUM_SLOTS, ...`` in that
    order (from 0.0), then a pairwise tree over the slots in use (the smallest power of two
    ``span >= min(count, SUM_SLOTS)``) adds slot ``k + w`` into slot ``k`` for
    ``w = 1, 2, 4, ... < span``. NumPy's elementwise float64 additions round as the kernel's do."""
    v = np.asarray(values, dtype=np.float64).ravel()
    span = 1
    while span < SUM_SLOTS and span < v.size:
        span *= 2
    slots = np.zeros(span)
    for start in range(0, v.size, SUM_SLOTS):
        chunk = v[start : start + SUM_SLOTS]
        slots[: chunk.size] += chunk
    w = 1
    while w < span:
        slots[:: 2 * w] += slots[w :: 2 * w]
        w *= 2
    return float(slots[0])


def fixed_sum_columns(partial: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """bias_grad_finish's ``db``: fixed_sum of each column, rounded to the dtype."""
    with np.errstate(over="ignore"):
        return np.array([fixed_sum(c) for c in partial.T]).astype(dtype)


def test_fixed_sum_slots_match_the_header() -> None:
    m = re.search(r"\bSUM_SLOTS = (\d+)\b", ck.source("output_layer"))
    assert m is not None and int(m[1]) == SUM_SLOTS


def _finalize_case(name: str, row_loss: np.ndarray, scale: float, bad: bool) -> None:
    dtype = row_loss.dtype
    rows = row_loss.size

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        rl = mem.put(row_loss, True)
        part = mem.put(np.full(ck.loss_parts(rows), np.nan))
        loss = mem.put(np.full(1, -1.0, dtype))
        st = mem.put(status_word())
        launch(ck.loss_partial(dtype), (rl, i64(rows), part))
        launch(ck.finalize_loss(dtype), (part, i64(rows), np.float64(scale), loss, st))
        return [loss, st]

    what = f"{name} rows={rows}"
    loss, st = run_everywhere(body, what)
    if bad:
        assert not np.isfinite(loss[0]), what
    else:
        assert_close(loss, [math.fsum(row_loss.astype(np.float64)) * scale], what)
        # bit for bit the documented order (run_everywhere has held every shape to the same bits)
        want = np.array([fixed_sum(row_loss) * scale]).astype(dtype)
        assert bits_equal(loss, want), f"{what}: {loss[0]!r} is not fixed_sum's {want[0]!r}"
    expect_status(st, bad, what)


def check_finalize_loss(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    # 300 rows: more than any block has threads, so threads fill several slots each; 2500: more
    # than SUM_SLOTS, so slots sum two or three rows each
    for rows in (1, 3, 45, 300, 2500):
        row_loss = rng.random(rows).astype(dtype) * 3.0
        _finalize_case(name, row_loss, 1.0 / rows, False)
        _finalize_case(name, row_loss, 0.5 / rows, False)
    big = float(np.finfo(dtype).max) * 0.75
    for poison in (np.nan, np.inf, big):  # big: finite rows whose total overflows the dtype
        row_loss = rng.random(45).astype(dtype)
        row_loss[[7, 30]] = poison
        _finalize_case(name, row_loss, 1.0, True)


def check_record_loss(name: str, dtype: np.dtype) -> None:
    """Three steps' losses into a block (from slot 2) and the float64 total, as the host adds."""
    losses = np.array([0.3, 1.7, 2.5e-3], dtype)
    block, total = np.full(6, -1.0, dtype), np.array([10.0])
    ledger = np.array([block.ctypes.data, 2, total.ctypes.data], np.int64)
    want = 10.0
    for v in losses:
        kernel(name)((1,), (32,), (np.array([v]), np.float64(64.0), ledger))
        want += float(v) * 64.0
    assert bits_equal(block[2:5], losses) and ledger[1] == 5, (block, ledger)
    assert total[0] == want, (total[0], want)  # bit for bit the host's sum


def check_output_layer(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    if parse(name)[0] in ("loss_partial", "finalize_loss"):
        check_finalize_loss(name, dtype, params, rng)
    elif parse(name)[0] == "record_loss":
        check_record_loss(name, dtype)
    else:
        check_output_kernel(name, dtype, params, rng)


#: The single-block ``finalize_loss`` the two-stage sum replaced (before issue 26), verbatim
#: but for its name, compiled beside the current kernels to compare their bits.
ONE_BLOCK_FINALIZE = """
namespace gpubp {
template <typename T>
__global__ void finalize_loss_one_block(const T* __restrict__ row_loss, i64 rows, double scale,
                                        T* __restrict__ loss, int* __restrict__ status) {
    __shared__ double part[SUM_SLOTS];
    if (blockIdx.x != 0) return;
    const double s =
        fixed_sum(rows, [&](i64 i) { return static_cast<double>(row_loss[i]); }, part);
    if (threadIdx.x == 0) {
        const T value = static_cast<T>(s * scale);
        loss[0] = value;
        if (!finite(value)) flag_bad(status);
    }
}
}  // namespace gpubp
"""


@functools.cache
def one_block_module() -> emu.Module:
    names = [f"gpubp::finalize_loss_one_block<{t}>" for t in ("float", "double")]
    names += [f(dt) for dt in ("float32", "float64") for f in (ck.loss_partial, ck.finalize_loss)]
    return emu.Module(ck.source("output_layer") + ONE_BLOCK_FINALIZE, names)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [1, 255, 256, 257, 100_000, 262_144])
def test_multi_block_loss_sum_has_the_single_block_bits(rows: int, dtype: str) -> None:
    """The two-stage loss sum (many blocks, then one) gives the old single-block kernel's bits,
    in the backend's launch shape and in others."""
    dt = np.dtype(dtype)
    mod = one_block_module()
    row_loss = (np.random.default_rng(rows).random(rows) * 3.0).astype(dt)
    scale = 1.0 / rows
    old_loss, old_st = np.full(1, -1.0, dt), status_word()
    old = mod.get_function(f"gpubp::finalize_loss_one_block<{ck.CUDA_TYPES[dtype]}>")
    old((1,), (ck.reduction_threads(rows),), (row_loss, i64(rows), np.float64(scale), old_loss,
                                               old_st))  # fmt: skip
    parts = ck.loss_parts(rows)
    shapes = [(parts, ck.reduction_threads(min(rows, ck.LOSS_PART_SLOTS))), (1, 64), (5, 96)]
    for grid, block in shapes:
        part, loss, st = np.full(parts, np.nan), np.full(1, -1.0, dt), status_word()
        mod.get_function(ck.loss_partial(dt))((grid,), (block,), (row_loss, i64(rows), part))
        mod.get_function(ck.finalize_loss(dt))(
            (1,), (ck.reduction_threads(parts),), (part, i64(rows), np.float64(scale), loss, st)
        )
        where = f"rows={rows} grid={grid} block={block}"
        assert bits_equal(loss, old_loss), f"{where}: {loss} is not the one block's {old_loss}"
        expect_status(st, False, f"rows={rows}")
    assert_close(loss, [math.fsum(row_loss.astype(np.float64)) * scale], f"rows={rows}")


# --- bias_grad.cu -----------------------------------------------------------------------------

#: (rows, n, plan or None for the catalogue's, delta offset by one element). (70, 8, (70, 1)):
#: 70 splits, more than a 32- or 64-thread block has threads.
BIAS_GRAD_CASES: tuple[tuple[int, int, tuple[int, int] | None, bool], ...] = (
    (3, 1, None, False),
    (40, 3, (5, 8), True),
    (100, 45, None, False),
    (70, 8, (70, 1), True),
)


def _splits(delta: np.ndarray, plan: tuple[int, int]) -> np.ndarray:
    """float64 ``(splits, n)`` column sums of each split of rows (the partial's contract)."""
    splits, per = plan
    d = delta.astype(np.float64)
    return np.array([d[s * per : (s + 1) * per].sum(axis=0) for s in range(splits)])


def _bias_grad_partial_case(name: str, delta: np.ndarray, plan: tuple[int, int], off: bool) -> None:
    (rows, n), (splits, per) = delta.shape, plan

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        dd = mem.put(delta, off)
        part = mem.put(np.full(splits * n, np.nan))
        launch(name, (dd, i64(rows), i32(n), i64(per), i64(splits), part))
        return [part]

    what = f"{name} {delta.shape} plan={plan}"
    (part,) = run_everywhere(body, what)
    assert_close(part.reshape(splits, n), _splits(delta, plan), what)


def check_bias_grad_partial(name: str, dtype: np.dtype, rng: np.random.Generator) -> None:
    for rows, n, plan, off in BIAS_GRAD_CASES:
        delta = rng.normal(0.0, 1.0, (rows, n)).astype(dtype)
        _bias_grad_partial_case(name, delta, plan or ck.bias_grad_plan(rows, n), off)


def _bias_grad_finish_case(
    name: str, partial: np.ndarray, dtype: np.dtype, bad_before: bool, what: str
) -> tuple[np.ndarray, np.ndarray]:
    splits, n = partial.shape

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        part = mem.put(partial)
        db = mem.put(np.full(n, -7.0, dtype), True)
        st = mem.put(status_word(bad_before))
        launch(name, (part, i64(splits), i32(n), db, st))
        return [db, st]

    db, st = run_everywhere(body, what)
    return db, st


def check_bias_grad_finish(name: str, dtype: np.dtype, rng: np.random.Generator) -> None:
    for rows, n, plan, _ in BIAS_GRAD_CASES:
        plan = plan or ck.bias_grad_plan(rows, n)
        delta = rng.normal(0.0, 1.0, (rows, n)).astype(dtype)
        what = f"{name} {delta.shape} plan={plan}"
        partial = _splits(delta, plan)
        db, st = _bias_grad_finish_case(name, partial, dtype, False, what)
        assert_close(db, delta.astype(np.float64).sum(axis=0), f"{what}: db")
        assert bits_equal(db, fixed_sum_columns(partial, dtype)), f"{what}: not fixed_sum's order"
        expect_status(st, False, what)
        # a step already flagged: db is still written, the flag stays
        db2, st2 = _bias_grad_finish_case(name, partial, dtype, True, what + " (flagged before)")
        assert bits_equal(db2, db), what + " (flagged before)"
        expect_status(st2, True, what + " (flagged before)")
    # more splits than SUM_SLOTS: every slot sums two or three of them (the block-size
    # independence of fixed_sum is in how a slot's items are assigned, which this exercises)
    for splits in (SUM_SLOTS + 1, 2 * SUM_SLOTS + 77):
        partial = rng.normal(0.0, 1.0, (splits, 3))
        what = f"{name} {splits} splits"
        db, st = _bias_grad_finish_case(name, partial, dtype, False, what)
        assert_close(db, partial.sum(axis=0), f"{what}: db")
        assert bits_equal(db, fixed_sum_columns(partial, dtype)), f"{what}: not fixed_sum's order"
        expect_status(st, False, what)
    # a non-finite column sum sets STATUS_BAD: NaN, infinity, and finite partial sums whose
    # total overflows the dtype (float32: 2 * 2.5e38)
    big = float(np.finfo(dtype).max) * 0.75
    for poison in (np.nan, np.inf, big):
        n = 5
        partial = rng.normal(0.0, 1.0, (2, n))
        partial[:, 2] = poison
        what = f"{name} column 2 of 5 summing to {poison}"
        db, st = _bias_grad_finish_case(name, partial, dtype, False, what)
        assert not np.isfinite(db[2]), what
        with np.errstate(over="ignore"):  # float64: the poisoned column's 2 * 1.3e308
            want = partial.sum(axis=0)
        assert_close(np.delete(db, 2), np.delete(want, 2), what)
        expect_status(st, True, what)


def check_bias_grad(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    template = parse(name)[0]
    if template == "bias_grad_partial":
        check_bias_grad_partial(name, dtype, rng)
    elif template == "bias_grad_finish":
        check_bias_grad_finish(name, dtype, rng)
    else:
        check_bias_grad_layers(name, dtype, rng)


#: (rows, layer widths, deltas offset by one element) of the one-launch bias gradients: widths
#: of one column, of a tile and one more (33), of eight tiles and one more (257); one row, an
#: awkward batch (37), several splits of 32 rows (1000), and more splits than SUM_SLOTS (33000
#: rows: 1032 splits, every slot of fixed_sum adding two).
BIAS_LAYER_CASES: tuple[tuple[int, tuple[int, ...], bool], ...] = (
    (1, (1, 33, 257), False),
    (37, (257, 1, 33), True),
    (1000, (33, 1, 257, 5), False),
    (33000, (1, 3), True),
)


def _bias_layers_run(
    dtype: np.dtype, deltas: list[np.ndarray], off: bool, what: str
) -> list[np.ndarray]:
    """``bias_grad_partial_layers`` then ``bias_grad_finish_layers`` over every launch shape:
    ``[db_0, ..., db_{L-1}, partial, status]``."""
    rows = [(d.shape[0], d.shape[1]) for d in deltas]
    items = ck.bias_table([(0, 0, r, n) for r, n in rows])[1]

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        dd = [mem.put(d, off) for d in deltas]
        dbs = [mem.put(np.full(d.shape[1], -7.0, dtype), not off) for d in deltas]
        ptrs = [(x.ctypes.data, b.ctypes.data, r, n) for x, b, (r, n) in zip(dd, dbs, rows)]
        table, items, tiles, _ = ck.bias_table(ptrs)
        td, part = mem.put(table), mem.put(np.full(items, np.nan))
        st = mem.put(status_word())
        layers = i32(len(deltas))
        launch(ck.bias_grad_partial_layers(dtype), (td, layers, i64(items), part))
        launch(ck.bias_grad_finish_layers(dtype), (td, layers, i64(tiles), part, st))
        return [*dbs, part, st]

    got = run_everywhere(body, what)
    assert got[-2].size == items
    return got


def _bias_one_layer(dtype: np.dtype, delta: np.ndarray) -> list[np.ndarray]:
    """The per-layer kernels on one delta: ``[db, partial, status]``."""
    (rows, n), (splits, per) = delta.shape, ck.bias_grad_plan(*delta.shape)

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        dd, db = mem.put(delta), mem.put(np.full(n, -7.0, dtype))
        part, st = mem.put(np.full(splits * n, np.nan)), mem.put(status_word())
        launch(ck.bias_grad_partial(dtype), (dd, i64(rows), i32(n), i64(per), i64(splits), part))
        launch(ck.bias_grad_finish(dtype), (part, i64(splits), i32(n), db, st))
        return [db, part, st]

    return run_everywhere(body, f"one layer {delta.shape}", ((2, 256, "forward"),))


def check_bias_grad_layers(name: str, dtype: np.dtype, rng: np.random.Generator) -> None:
    """Every layer's bias gradient in two launches: bit for bit the per-layer kernels' (partial
    sums and db) and the fixed_sum order; a non-finite column of one layer flags the step, the
    other layers' columns are still written."""
    big = float(np.finfo(dtype).max) * 0.75
    cases = [(r, w, off, None) for r, w, off in BIAS_LAYER_CASES]
    cases += [(4, (3, 33, 2), False, p) for p in (np.nan, np.inf, big)]
    for rows, widths, off, poison in cases:
        deltas = [rng.normal(0.0, 1.0, (rows, n)).astype(dtype) for n in widths]
        if poison is not None:
            deltas[1][:, 31] = poison  # layer 1's column 31 sums to NaN or infinity
        what = f"{name} rows={rows} widths={widths} offset={off} poison={poison}"
        *dbs, part, st = _bias_layers_run(dtype, deltas, off, what)
        start, flagged = 0, []
        for k, (d, db) in enumerate(zip(deltas, dbs)):
            one_db, one_part, one_st = _bias_one_layer(dtype, d)
            flagged.append(bool(one_st[ck.STATUS_BAD]))
            here = f"{what}: layer {k}"
            assert bits_equal(part[start : start + one_part.size], one_part), here + " partial"
            assert bits_equal(db, one_db), here + ": db differs from the per-layer kernels'"
            splits = ck.bias_grad_plan(*d.shape)[0]
            want = fixed_sum_columns(one_part.reshape(splits, d.shape[1]), dtype)
            assert bits_equal(db, want), here + ": not fixed_sum's order"
            start += one_part.size
            if poison is None:
                assert_close(db, d.astype(np.float64).sum(axis=0), here)
        assert start == part.size, what
        assert flagged == [k == 1 and poison is not None for k in range(len(deltas))], what
        expect_status(st, poison is not None, what)


# --- optimizers.cu and guard.cu: tables of tensors -------------------------------------------

#: Tensor sizes of the update table and which of (param, grad, state1, state2) are offset by one
#: element: one element; a short misaligned tensor; a long one (vectors, then a scalar tail, and
#: several chunks with chunk=12); vectors only; a misaligned gradient alone; a misaligned state.
TABLE_TENSORS: tuple[tuple[int, frozenset[str]], ...] = (
    (1, frozenset()),
    (3, frozenset({"p"})),
    (45, frozenset()),
    (8, frozenset()),
    (13, frozenset({"g"})),
    (20, frozenset({"s1", "s2"})),
)
CHUNKS: tuple[int, ...] = (ck.CHUNK, 12)


def _optimizers_for(name: str) -> list[optim.Optimizer]:
    template, dtype, params = parse(name)
    check = template.endswith("_check_table")  # the same rules, checked instead of applied
    if template in ("sgd_update_table", "sgd_check_table"):
        momentum, nesterov = bool(params[0]), bool(params[1])
        mu = 0.9 if momentum else 0.0
        opts: list[optim.Optimizer] = [
            optim.SGD(lr=0.1, momentum=mu, nesterov=nesterov),
            optim.SGD(lr=0.05, momentum=mu, nesterov=nesterov, weight_decay=0.01),
        ]
        build = ck.sgd_check_table if check else ck.sgd_update_table
        assert build(dtype, momentum, nesterov) == name
    else:
        decoupled = bool(params[0])
        opts = [
            optim.Adam(lr=0.01, weight_decay=0.0, decoupled=decoupled),
            optim.AdamW(lr=0.01, weight_decay=0.1)
            if decoupled
            else optim.Adam(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        ]
        for o in opts:
            built = ck.update_table(o.op, dtype, o.variant, check=check)
            assert built == name
    return opts


def _slots(opt: Any) -> int:
    if opt.kind == "sgd":
        return 1 if opt.momentum else 0
    return 2


def _table_body(
    name: str,
    opt: optim.Optimizer,
    params: list[np.ndarray],
    grads: list[list[np.ndarray]],
    chunk: int,
    bad: bool,
) -> Callable[[Launch, Memory], list[np.ndarray]]:
    """Run len(grads[0]) optimizer steps over the table of params (state starts at zero)."""
    dtype = params[0].dtype
    slots = _slots(opt)
    steps = len(grads[0])

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        ps, gs, states, entries = [], [], [], []
        for (size, off), p, g in zip(TABLE_TENSORS, params, grads):
            pd = mem.put(p, "p" in off)
            gd = mem.put(g[0], "g" in off)
            s = [mem.put(np.zeros(size, dtype), f"s{k + 1}" in off) for k in range(slots)]
            ptr = [x.ctypes.data for x in s] + [0] * (2 - slots)
            ps.append(pd)
            gs.append(gd)
            states += s
            entries.append((pd.ctypes.data, gd.ctypes.data, ptr[0], ptr[1], size))
        table, chunks = ck.build_table(entries, chunk)
        td = mem.put(table)
        hpd = mem.put(np.zeros(ck.HP_SLOTS, dtype))
        st = mem.put(status_word(bad))
        for step in range(1, steps + 1):
            for gd, g in zip(gs, grads):
                gd[...] = g[step - 1]
            hpd[...] = ck.hyperparameters(opt, step, dtype)
            launch(name, (td, i32(len(entries)), i64(chunks), i64(chunk), hpd, st))
        return [*ps, *states, st]

    return body


def _reference_steps(
    opt: Any, p: np.ndarray, grads: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``len(grads)`` steps of ``opt`` on ``p`` by the reference (state starts at zero)."""
    p64 = p.astype(np.float64)
    state = [np.zeros(p.size) for _ in range(_slots(opt))]
    for step, g in enumerate(grads, start=1):
        if opt.kind == "sgd":
            buf = state[0] if state else None
            p64, buf = ref.sgd_update(
                p64, g, buf, opt.lr, opt.momentum, opt.nesterov, opt.weight_decay
            )
            state = [] if buf is None else [buf]
        else:
            b1, b2 = opt.betas
            p64, m, v = ref.adam_update(
                p64, g, state[0], state[1], step, opt.lr, b1, b2, opt.eps, opt.weight_decay,
                opt.decoupled,
            )  # fmt: skip
            state = [m, v]
    return p64, state


def check_optimizers(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    steps = 3
    for opt in _optimizers_for(name):
        for chunk in CHUNKS:
            ps = [rng.normal(0.0, 1.0, size).astype(dtype) for size, _ in TABLE_TENSORS]
            gs = [
                [rng.normal(0.0, 1.0, size).astype(dtype) for _ in range(steps)]
                for size, _ in TABLE_TENSORS
            ]
            what = f"{name} {opt!r} chunk={chunk}"
            out = run_everywhere(_table_body(name, opt, ps, gs, chunk, False), what)
            got_p, got_s, st = out[: len(ps)], out[len(ps) : -1], out[-1]
            want_p, want_s = [], []
            for p, g in zip(ps, gs):
                p64, state = _reference_steps(opt, p, g)
                want_p.append(p64)
                want_s += state
            for k, (got, want) in enumerate(zip(got_p, want_p)):
                assert_close(got, want, f"{what}: tensor {k}")
            for k, (got, want) in enumerate(zip(got_s, want_s)):
                assert_close(got, want, f"{what}: state {k}")
            expect_status(st, False, what)
            # STATUS_BAD set before the update: no parameter and no state changes
            out = run_everywhere(_table_body(name, opt, ps, gs, chunk, True), what + " flagged")
            for k, (got, p) in enumerate(zip(out[: len(ps)], ps)):
                assert bits_equal(got, p), f"{what} flagged: tensor {k} changed"
            for k, got in enumerate(out[len(ps) : -1]):
                assert not got.any(), f"{what} flagged: state {k} changed"
            expect_status(out[-1], True, what + " flagged")


def check_update_checks(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    """The check kernels: nothing written, ever; STATUS_BAD exactly when a new parameter or
    state value would be NaN or infinite (a NaN gradient, or an update that overflows), at the
    first, a middle and the last element, in aligned and misaligned tensors."""
    big = float(np.finfo(dtype).max)
    cases = [(0, 0, "nan-grad"), (1, 2, "overflow"), (2, 22, "overflow"), (4, 12, "nan-grad")]
    cases.append((5, 19, "overflow"))
    for opt in _optimizers_for(name):
        for chunk in CHUNKS:
            ps = [rng.normal(0.0, 1.0, size).astype(dtype) for size, _ in TABLE_TENSORS]
            gs = [[rng.normal(0.0, 1.0, size).astype(dtype)] for size, _ in TABLE_TENSORS]
            for case in [None, *cases]:
                p2, g2 = [p.copy() for p in ps], [[g[0].copy()] for g in gs]
                if case is not None:
                    t, i, how = case
                    if how == "nan-grad":
                        g2[t][0][i] = np.nan
                    else:  # p - lr g beyond the largest number (SGD); g^2 overflows v (Adam)
                        p2[t][i], g2[t][0][i] = big, -big
                what = f"{name} {opt!r} chunk={chunk} case={case}"
                out = run_everywhere(_table_body(name, opt, p2, g2, chunk, False), what)
                for k, (got, p) in enumerate(zip(out[: len(ps)], p2)):
                    assert bits_equal(got, p), f"{what}: tensor {k} written"
                for k, got in enumerate(out[len(ps) : -1]):
                    assert not got.any(), f"{what}: state {k} written"
                expect_status(out[-1], case is not None, what)


def _guard_table(
    mem: Memory, buffers: list[np.ndarray], column: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    placed, entries = [], []
    for (size, off), x in zip(TABLE_TENSORS, buffers):
        xd = mem.put(x, bool(off))
        placed.append(xd)
        row = [0, 0, 0, 0, size]
        row[column] = xd.ctypes.data
        entries.append((row[0], row[1], row[2], row[3], row[4]))
    table, _ = ck.build_table(entries)
    return mem.put(table), placed


def _finish_step_case(name: str, bad: bool, skipped: int) -> None:
    start = status_word(bad)
    start[ck.STATUS_SKIPPED] = skipped

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        st = mem.put(start)
        launch(name, (st,))
        return [st]

    (st,) = run_everywhere(body, f"{name} bad={bad} skipped={skipped}")
    want = start.copy()
    want[ck.STATUS_SKIPPED] += int(bad)  # once per launch, whatever the grid
    assert np.array_equal(st, want), f"{name}: {st}, expected {want}"


def _check_finite_case(name: str, grads: list[np.ndarray], poisoned: bool, what: str) -> None:
    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        td, _ = _guard_table(mem, grads, ck.TAB_GRAD)
        st = mem.put(status_word())
        launch(name, (td, i32(len(grads)), st))
        return [st]

    (st,) = run_everywhere(body, what)
    expect_status(st, poisoned, what)


def _zero_if_bad_case(name: str, bufs: list[np.ndarray], bad: bool) -> None:
    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        td, placed = _guard_table(mem, bufs, ck.TAB_PARAM)
        st = mem.put(status_word(bad))
        launch(name, (td, i32(len(bufs)), st))
        return [*placed, st]

    out = run_everywhere(body, f"{name} bad={bad}")
    for k, (got, x) in enumerate(zip(out[:-1], bufs)):
        want = np.zeros_like(x) if bad else x
        assert bits_equal(got, want), f"{name} bad={bad}: buffer {k} is {got}"
    expect_status(out[-1], bad, f"{name} bad={bad}")


def check_guard(
    name: str, dtype: np.dtype | None, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    template = parse(name)[0]
    if template == "finish_step":
        for bad, skipped in ((False, 0), (True, 0), (True, 5), (False, 5)):
            _finish_step_case(name, bad, skipped)
        return
    assert dtype is not None
    sizes = [size for size, _ in TABLE_TENSORS]
    if template == "check_finite_table":
        # healthy; then one NaN or infinity at the first, a middle and the last element, and at
        # the last element of misaligned tensors: (tensor, index, value)
        cases: list[tuple[int, int, float] | None] = [None]
        cases += [(0, 0, np.nan), (2, 44, np.inf), (len(sizes) - 1, sizes[-1] - 1, -np.inf)]
        cases += [(1, 2, np.nan), (4, 12, np.inf)]
        for case in cases:
            grads = [rng.normal(0.0, 1.0, size).astype(dtype) for size in sizes]
            if case is not None:
                grads[case[0]][case[1]] = case[2]
            _check_finite_case(name, grads, case is not None, f"{name} poison={case}")
        return
    assert template == "zero_if_bad_table", template
    for bad in (False, True):
        _zero_if_bad_case(name, [rng.normal(0.0, 1.0, size).astype(dtype) for size in sizes], bad)


# --- metrics.cu -------------------------------------------------------------------------------


def _scores(rows: int, n: int, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """Small integers (many ties), a few NaN and infinities, a row of -inf and one of NaN."""
    a = rng.integers(0, 4, (rows, n)).astype(np.float64)
    a[rng.random((rows, n)) < 0.08] = np.nan
    a[rng.random((rows, n)) < 0.05] = np.inf
    a[rng.random((rows, n)) < 0.05] = -np.inf
    if rows > 2:
        a[1] = -np.inf
        a[2] = np.nan
    return a.astype(dtype)


def _threshold_case(name: str, a: np.ndarray, y: np.ndarray, off: bool) -> None:
    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        ad, yd = mem.put(a, off), mem.put(y, off)
        correct = mem.put(np.array([3], np.uint64))
        launch(name, (ad, yd, i64(a.size), correct))
        return [correct]

    (correct,) = run_everywhere(body, f"{name} {a.shape}")
    want = 3 + int(np.sum((a > 0.5) == (y > 0.5)))  # NaN > 0.5 is false, on both sides
    assert correct[0] == want, f"{name} {a.shape}: {correct[0]} correct, expected {want}"


def _argmax_case(
    name: str, a: np.ndarray, y: np.ndarray, labels: np.ndarray, off: bool, with_pred: bool
) -> None:
    target = parse(name)[2][0]
    rows, n = a.shape

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        ad = mem.put(a, off)
        yd = mem.put(y) if target == ck.TARGET_DENSE else NULL
        ld = mem.put(labels, off) if target == ck.TARGET_LABELS else NULL
        pred = mem.put(np.full(rows, -5, np.int64), off)
        correct = mem.put(np.array([7], np.uint64))
        st = mem.put(status_word())
        args = (ad, yd, ld, i64(rows), i32(n), pred if with_pred else NULL, correct, st)
        launch(name, args)
        return [pred, correct, st]

    what = f"{name} {a.shape} pred={with_pred}"
    pred, correct, st = run_everywhere(body, what)
    want_pred = np.argmax(a, axis=1)  # NumPy's rule: the first maximum, and a NaN beats all
    if with_pred:
        assert np.array_equal(pred, want_pred), f"{what}: {pred}, expected {want_pred}"
    else:
        assert (pred == -5).all(), f"{what}: pred written through a null pointer"
    if target == ck.TARGET_NONE:
        want = 7  # no targets: the counter is not touched
    else:
        truth = labels if target == ck.TARGET_LABELS else np.argmax(y, axis=1)
        want = 7 + int(np.sum(want_pred == truth))
    assert correct[0] == want, f"{what}: {correct[0]} correct, expected {want}"
    expect_status(st, False, what)


def check_metrics(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    template = parse(name)[0]
    for rows, n, off in ((2, 1, False), (5, 3, True), (9, 45, False), (4, 8, True)):
        if template == "threshold_accuracy":
            a = np.where(rng.random((rows, n)) < 0.3, 0.5, rng.random((rows, n))).astype(dtype)
            a[0, 0] = np.nan
            y = rng.integers(0, 2, (rows, n)).astype(dtype)
            _threshold_case(name, a, y, off)
            continue
        a, y = _scores(rows, n, dtype, rng), _scores(rows, n, dtype, rng)
        labels = rng.integers(0, n, rows).astype(np.int64)
        for with_pred in (True, False):
            _argmax_case(name, a, y, labels, off, with_pred)


# --- sparse.cu --------------------------------------------------------------------------------

#: (rows, K, n, density): an empty matrix, a row and a column, widths on both sides of 32 and
#: not multiples of it, a dense-ish one (each case also gets two empty rows).
SPARSE_CASES: tuple[tuple[int, int, int, float], ...] = (
    (3, 4, 5, 0.0),
    (1, 9, 33, 0.5),
    (6, 1, 1, 0.7),
    (9, 40, 70, 0.2),
    (5, 7, 31, 0.9),
)


def _csr_parts(rows: int, K: int, density: float, dtype: np.dtype, rng: np.random.Generator):
    """``(indptr int64, indices int32, data)`` of a random CSR ``(rows, K)`` (sorted columns),
    rows 0 and ``rows // 2`` empty."""
    mask = rng.random((rows, K)) < density
    mask[[0, rows // 2]] = False
    dense = np.where(mask, rng.normal(0.0, 1.0, (rows, K)), 0.0).astype(dtype)
    counts = mask.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.nonzero(mask)[1].astype(np.int32)
    return indptr, indices, dense[mask], dense


def _csr_dense_case(
    name: str, parts: tuple[np.ndarray, ...], w: np.ndarray, w_t: bool, out_t: bool
) -> None:
    """One launch of ``csr_dense`` on ``parts = (indptr, indices, data, dense)`` times ``w``,
    ``w`` stored transposed (``w_t``) or not, the output written transposed (``out_t``)."""
    indptr, indices, data, dense = parts
    rows, K, n = dense.shape[0], w.shape[0], w.shape[1]
    dtype = w.dtype

    def body(launch: Launch, mem: Memory) -> list[np.ndarray]:
        ip, ix = mem.put(indptr), mem.put(indices if indices.size else np.zeros(1, i32))
        dv = mem.put(data if data.size else np.zeros(1, dtype))
        wd = mem.put(w.T if w_t else w, True)  # offset: no alignment is assumed
        od = mem.put(np.full((n, rows) if out_t else (rows, n), np.nan, dtype))
        ws, os_ = ((1, K) if w_t else (n, 1)), ((1, rows) if out_t else (n, 1))
        args = (ip, ix, dv, i64(rows), wd, i64(ws[0]), i64(ws[1]), i32(n), od, i64(os_[0]),
                i64(os_[1]))  # fmt: skip
        launch(name, args)
        return [od.T if out_t else od]

    what = f"{name} ({rows}, {K}) @ ({K}, {n}) w.T={w_t} out.T={out_t}"
    (got,) = run_everywhere(body, what)
    assert_close(got, dense.astype(np.float64) @ w.astype(np.float64), what)
    assert not got[0].any() and not got[rows // 2].any(), f"{what}: empty rows not 0"


def check_sparse(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    """``out = CSR @ w``: the weights read, and the output written, in either layout (strides),
    against the float64 product; zeros for the empty rows."""
    for rows, K, n, density in SPARSE_CASES:
        parts = _csr_parts(rows, K, density, dtype, rng)
        w = rng.normal(0.0, 1.0, (K, n)).astype(dtype)
        for w_t, out_t in itertools.product((False, True), repeat=2):
            _csr_dense_case(name, parts, w, w_t, out_t)


# --- optimizers.cu: Adam's step scalars and the step counter on the device ---------------------

#: (lr, beta1, beta2, eps) of the step-scalar checks, and the steps (1 first) they are taken at.
ADAM_SETTINGS = ((1e-3, 0.9, 0.999, 1e-8), (0.3, 0.5, 0.9999, 1e-6), (2.0, 0.0, 0.0, 1e-3))
ADAM_STEPS = (1, 2, 10, 1000, 10**6)


def check_adam_step_scalars(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    """``HP_ALPHA`` and ``HP_EPS_HAT`` of step ``t`` from the counter ``t - 1``: within 2 ulps
    of ``optim.adam_scalars`` (float64) rounded to the dtype; every other slot the host's block
    in the dtype, bit for bit."""
    for lr, b1, b2, eps in ADAM_SETTINGS:
        opt = optim.Adam(lr=lr, betas=(b1, b2), eps=eps)
        hp64 = ck.hyperparameters(opt, 1, np.float64)
        for t in ADAM_STEPS:
            start = rng.normal(size=ck.HP_SLOTS).astype(dtype)

            def body(
                launch: Launch, mem: Memory, t: int = t, start: Any = start, hp64: Any = hp64
            ) -> list[Any]:
                hp, steps = mem.put(start), mem.put(np.array([t - 1], np.int64))
                launch(name, (hp, mem.put(hp64), steps))
                return [hp, steps]

            what = f"{name} lr={lr} betas=({b1}, {b2}) eps={eps} t={t}"
            hp, steps = run_everywhere(body, what)
            k = optim.adam_scalars(t, lr, b1, b2, eps, 0.0, False)
            for slot, value in (("ALPHA", k.alpha), ("EPS_HAT", k.eps_hat)):
                want, got = dtype.type(value), hp[ck.HP[slot]]
                ulps = abs(float(got) - float(want)) / float(np.spacing(want))
                assert ulps <= 2, f"{what}: {slot} {got!r}, expected {want!r} ({ulps:g} ulps)"
            rest = [i for i in range(ck.HP_SLOTS) if i not in (ck.HP["ALPHA"], ck.HP["EPS_HAT"])]
            host = ck.hyperparameters(opt, t, dtype)
            assert bits_equal(hp[rest], host[rest]) and steps[0] == t - 1, what


#: (optimizer, schedule) pairs of the schedule checks: every slot a rate changes, and both ways
#: of HP_DECAY; and the global steps (0 first) they are taken at: first, second, mid, last, beyond.
SCHEDULE_CASES = (
    (lambda: optim.SGD(lr=1.0, momentum=0.9, weight_decay=0.01), ("cosine", 0.1, 1000)),
    (lambda: optim.Adam(lr=1.0, weight_decay=0.01), ("cosine", 3e-3, 7)),
    (lambda: optim.AdamW(lr=1.0, weight_decay=0.05), ("cosine", 1e-3, 1)),
    (lambda: optim.SGD(lr=1.0, weight_decay=0.3), ("constant", 0.7, 10)),
)


def check_schedule_lr(
    name: str, dtype: np.dtype, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    """The rate of global step ``t`` (the counter, then advanced) and every slot derived from
    it: within 2 ulps of ``Schedule.at`` and ``catalogue.hyperparameters`` in float64 (the
    float64 block), and of those rounded to the dtype (the block the step reads); every other
    slot (Adam's step scalars too, which ``adam_step_scalars`` computes next) the host's. The
    host's kind (0) keeps the block's rate and the counter."""
    for make, (kind, peak, total) in SCHEDULE_CASES:
        opt, sched = make(), Schedule(kind, peak, total)
        for t in (0, 1, total // 2, total - 1, total, 3 * total + 1):
            hp64, block = ck.hyperparameters(opt, 1, np.float64), ck.schedule_block(opt, sched)

            def body(
                launch: Launch, mem: Memory, t: int = t, block: Any = block, hp64: Any = hp64
            ) -> list[Any]:
                hp, wide = mem.put(np.zeros(ck.HP_SLOTS, dtype)), mem.put(hp64)
                count = mem.put(np.array([t], np.int64))
                launch(name, (hp, wide, mem.put(block), count))
                return [hp, wide, count]

            what = f"{name} {kind} lr={peak} T={total} t={t} {type(opt).__name__}"
            hp, wide, count = run_everywhere(body, what)
            want = ck.hyperparameters(opt, 1, np.float64, lr=sched.at(t))
            for slot in ("ALPHA", "EPS_HAT"):  # Adam's, from the rate next (adam_step_scalars)
                want[ck.HP[slot]] = hp64[ck.HP[slot]]
            assert count[0] == t + 1, what
            for got_block, want_block in ((wide, want), (hp, want.astype(dtype))):
                ulps = np.abs(got_block - want_block) / np.spacing(np.abs(want_block))
                assert (ulps <= 2).all(), f"{what}: {got_block!r}, expected {want_block!r}"
    hp64 = ck.hyperparameters(optim.SGD(lr=0.25), 1, np.float64)

    def host(launch: Launch, mem: Memory) -> list[Any]:
        hp, wide = mem.put(np.zeros(ck.HP_SLOTS, dtype)), mem.put(hp64)
        count = mem.put(np.array([5], np.int64))
        launch(name, (hp, wide, mem.put(ck.schedule_block(optim.SGD(lr=0.25), None)), count))
        return [hp, wide, count]

    hp, wide, count = run_everywhere(host, f"{name} host's rate")
    assert bits_equal(wide, hp64) and bits_equal(hp, hp64.astype(dtype)) and count[0] == 5


def check_count_step(
    name: str, dtype: np.dtype | None, params: tuple[int, ...], rng: np.random.Generator
) -> None:
    """The counter advances by one per launch, whatever the grid, unless STATUS_BAD is set."""
    for bad in (False, True):

        def body(launch: Launch, mem: Memory, bad: bool = bad) -> list[Any]:
            steps, st = mem.put(np.array([41], np.int64)), mem.put(status_word(bad))
            launch(name, (steps, st))
            return [steps, st]

        steps, st = run_everywhere(body, f"{name} bad={bad}")
        assert steps[0] == 41 + (not bad), f"{name} bad={bad}: {steps[0]}"
        expect_status(st, bad, f"{name} bad={bad}")


# --- one test body per family -----------------------------------------------------------------

Check = Callable[[str, Any, tuple[int, ...], np.random.Generator], None]

#: family -> kernel template -> its check.
CHECKS: dict[str, dict[str, Check]] = {
    "bias_activation": {
        "bias_activation": check_bias_activation,
        "bias_softmax": check_bias_activation,
    },
    "hidden_delta": {"hidden_delta": check_hidden_delta},
    "output_layer": {
        "softmax_cross_entropy": check_output_layer,
        "bce_loss": check_output_layer,
        "poisson_loss": check_output_layer,
        "mse_loss": check_output_layer,
        "loss_partial": check_output_layer,
        "finalize_loss": check_output_layer,
        "record_loss": check_output_layer,
    },
    "bias_grad": {
        "bias_grad_partial": check_bias_grad,
        "bias_grad_finish": check_bias_grad,
        "bias_grad_partial_layers": check_bias_grad,
        "bias_grad_finish_layers": check_bias_grad,
    },
    "optimizers": {
        "sgd_update_table": check_optimizers,
        "adam_update_table": check_optimizers,
        "sgd_check_table": check_update_checks,
        "adam_check_table": check_update_checks,
        "adam_step_scalars": check_adam_step_scalars,
        "count_step": check_count_step,
        "schedule_lr": check_schedule_lr,
    },
    "guard": {
        "check_finite_table": check_guard,
        "zero_if_bad_table": check_guard,
        "finish_step": check_guard,
    },
    "metrics": {"argmax_accuracy": check_metrics, "threshold_accuracy": check_metrics},
    "sparse": {"csr_dense": check_sparse},
}


def _family_test(family: str, name: str, rng: np.random.Generator) -> None:
    template, dtype, params = parse(name)
    CHECKS[family][template](name, dtype, params, rng)


def _names(family: str) -> Any:
    return pytest.mark.parametrize("name", ck.name_expressions(family), ids=_id)


@_names("bias_activation")
def test_bias_activation(name: str, rng: np.random.Generator) -> None:
    _family_test("bias_activation", name, rng)


@_names("hidden_delta")
def test_hidden_delta(name: str, rng: np.random.Generator) -> None:
    _family_test("hidden_delta", name, rng)


@_names("output_layer")
def test_output_layer(name: str, rng: np.random.Generator) -> None:
    _family_test("output_layer", name, rng)


@_names("bias_grad")
def test_bias_grad(name: str, rng: np.random.Generator) -> None:
    _family_test("bias_grad", name, rng)


@_names("optimizers")
def test_optimizers(name: str, rng: np.random.Generator) -> None:
    _family_test("optimizers", name, rng)


@_names("guard")
def test_guard(name: str, rng: np.random.Generator) -> None:
    _family_test("guard", name, rng)


@_names("metrics")
def test_metrics(name: str, rng: np.random.Generator) -> None:
    _family_test("metrics", name, rng)


@_names("sparse")
def test_sparse(name: str, rng: np.random.Generator) -> None:
    _family_test("sparse", name, rng)


def test_every_instantiation_is_tested() -> None:
    """The family tests above cover the whole catalogue: every instantiation's template has a
    check, and every ``__global__`` template of every source file is in the catalogue."""
    everything = {n for f in ck.FAMILIES for n in ck.name_expressions(f)}
    tested = {n for f in CHECKS for n in ck.name_expressions(f) if parse(n)[0] in CHECKS[f]}
    assert tested == everything, f"no check for {sorted(everything - tested)}"
    assert set(CHECKS) == set(ck.FAMILIES)
    for family in ck.FAMILIES:
        templates = set(ck.kernel_templates(family))
        assert templates == set(CHECKS[family]), family
        assert templates == {parse(n)[0] for n in ck.name_expressions(family)}, family


# --- the partial-warp launch guard ------------------------------------------------------------


def _warp_kernels() -> list[str]:
    """Instantiations whose kernel template begins with the ``whole_warps`` check (itself or
    through ``elementwise_loss``, the elementwise losses' row body)."""
    names = []
    for family in ck.FAMILIES:
        src = ck.source(family)
        for template in ck.kernel_templates(family):
            m = re.search(rf"__global__\s+void\s+{template}\s*\(.*?\{{(.*?)\n\}}", src, re.S)
            assert m is not None, template
            if "whole_warps(" in m[1] or "elementwise_loss<" in m[1]:
                names += [n for n in ck.name_expressions(family) if parse(n)[0] == template]
    return names


WARP_KERNELS = _warp_kernels()


def test_warp_kernels_are_found() -> None:
    templates = {parse(n)[0] for n in WARP_KERNELS}
    assert templates == {
        "bias_softmax",
        "softmax_cross_entropy",
        "mse_loss",
        "bce_loss",
        "poisson_loss",
        "argmax_accuracy",
    }


@pytest.mark.parametrize("name", WARP_KERNELS, ids=_id)
def test_partial_warp_launch_guard(name: str, rng: np.random.Generator) -> None:
    """A block of 48 threads (one and a half warps): STATUS_LAUNCH is set, nothing is written."""
    template, dtype, _ = parse(name)
    assert dtype is not None
    rows, n = 5, 7
    mem = Memory()
    z = mem.put(rng.normal(0.0, 1.0, (rows, n)).astype(dtype))
    b = mem.put(rng.normal(0.0, 1.0, n).astype(dtype))
    y = mem.put(rng.random((rows, n)).astype(dtype))
    labels = mem.put(rng.integers(0, n, rows).astype(np.int64))
    row_loss = mem.put(np.full(rows, -1.0, dtype))
    pred = mem.put(np.full(rows, -5, np.int64))
    correct = mem.put(np.array([7], np.uint64))
    st = mem.put(status_word())
    before = [np.array(x, copy=True) for x in (z, row_loss, pred, correct)]
    if template == "bias_softmax":
        args: tuple[Any, ...] = (z, b, i64(rows), i32(n), st)
    elif template == "argmax_accuracy":
        args = (z, y, labels, i64(rows), i32(n), pred, correct, st)
    else:
        inv = scalar(dtype, 1.0 / rows)
        args = (z, b, y, labels, i64(rows), i32(n), inv, row_loss, st)
    kernel(name)((2,), (48,), args)
    mem.assert_guards(name)
    for k, (x, x0) in enumerate(zip((z, row_loss, pred, correct), before)):
        assert bits_equal(x, x0), f"{name}: output {k} written by a refused launch"
    want = status_word()
    want[ck.STATUS_LAUNCH] = 1
    assert np.array_equal(st, want), f"{name}: status {st}, expected {want}"
