"""The emulated device catches what it exists to catch: defects injected into copies of kernels.

Each defect is a string replacement on :func:`catalogue.source` of a family (the shipped ``.cu``
files are never touched), built with ``Module(patched, [name])``, and run through the same checks
as ``tests/test_emulated_kernels.py``: every launch shape and block order, the float64
reference, bit-identity across runs, the guard bytes around every array, and the emulator's own
:class:`EmulatorError`. The unpatched kernel passes the same checks on the same data. The id of
each case names the checks that caught it:

=====================================================  ==========================================
defect                                                 caught by
=====================================================  ==========================================
a. ``__syncthreads`` removed from ``fixed_sum``: the    reference and bit-identity, in every
   first (after the slot sums) or the tree's (after     launch shape and block order (the tree
   each level); loss_partial, 2100 row losses           reads slots not yet written in this
                                                        launch: the values the previous launch
                                                        of the patched library left there)
b. ``whole_warps`` guard removed, 48-thread block        EmulatorError: the shuffle names lanes
                                                        that do not exist
c. ``aligned16`` test removed before a 16-byte load      UBSan in the ASan+UBSan build (subprocess)
d. grid-stride bound ``<`` made ``<=``                   guard bytes (a store past the end), the
                                                        reference (a read past the end brings in
                                                        the NaN guard), ASan heap-buffer-overflow
e. shuffle in a divergent branch                         EmulatorError; but two *different*
                                                        ``warp_sum`` calls in divergent branches
                                                        are only caught by the reference: the
                                                        emulator tells shuffles apart by the
                                                        source line of ``__shfl_xor_sync``,
                                                        which is warp_sum's own line for both
f. barrier not reached by every thread, barrier in a    EmulatorError
   divergent branch, a lane at a barrier while its
   warp waits at a shuffle (a deadlock on a GPU)
=====================================================  ==========================================

In-process runs use the ``plain`` build whatever ``GPUBP_EMU_VARIANT`` says (an injected
out-of-bounds access under ASan would end the test process); the sanitizer cases run a small
script in a subprocess with the ``asan`` build and its runtime preloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cudaemu import kernels as emu
from gpubp import reference as ref
from gpubp.backends.cuda import catalogue as ck

from .test_emulated_kernels import (
    COMBOS,
    NULL,
    TOL,
    Memory,
    _output_of,
    bits_equal,
    i32,
    i64,
    kernel,
    parse,
    status_word,
)

ROOT = Path(__file__).resolve().parent.parent

# --- running a kernel through every check -----------------------------------------------------


def patched(family: str, old: str, new: str) -> str:
    """``family``'s source with every ``old`` replaced by ``new`` (``old`` must be there)."""
    src = ck.source(family)
    assert old in src, f"{old!r} is not in {family}'s source any more: update the defect"
    return src.replace(old, new)


def _build(job: tuple[str, tuple[str, ...]]) -> None:
    emu.build(job[0], job[1], "plain")


@functools.cache
def _module(code: str, names: tuple[str, ...]) -> emu.Module:
    return emu.Module(code, names, variant="plain")


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    """The tolerance of tests/test_emulated_kernels.py; integers and non-finite entries exact."""
    if got.dtype.kind not in "f":
        return bool(np.array_equal(got, want))
    g, w = got.astype(np.float64), np.asarray(want, dtype=np.float64)
    fin = np.isfinite(w)
    if not np.array_equal(fin, np.isfinite(g)) or not np.array_equal(
        g[~fin], w[~fin], equal_nan=True
    ):
        return False
    if not fin.any():
        return True
    scale = max(float(np.max(np.abs(w[fin]))), float(np.finfo(np.float64).tiny))
    return float(np.max(np.abs(g[fin] - w[fin]))) / scale <= TOL[got.dtype]


Place = Callable[[Memory], tuple[tuple[Any, ...], list[np.ndarray]]]


@dataclasses.dataclass
class Verdict:
    """Which checks fired, and the emulator's message if it raised."""

    fired: set[str] = dataclasses.field(default_factory=set)
    message: str = ""  # every distinct EmulatorError message, one a line
    notes: list[str] = dataclasses.field(default_factory=list)


def check(
    fn: emu.Function,
    place: Place,
    expected: Sequence[np.ndarray],
    combos: Sequence[tuple[int, int, str]] = COMBOS,
) -> Verdict:
    """Run ``fn`` once per launch shape and block order on fresh memory from ``place`` and note
    every check that fails: ``emulator`` (EmulatorError), ``guard`` (a store outside an array),
    ``reference`` (an output differs from ``expected`` beyond the tolerance, or a status word
    differs), ``bit-identity`` (two runs differ)."""
    v = Verdict()
    messages: list[str] = []
    first: list[np.ndarray] | None = None
    for grid, block, order in combos:
        where = f"grid={grid} block={block} order={order}"
        mem = Memory()
        args, outs = place(mem)
        try:
            fn((grid,), (block,), args, order=order)
        except emu.EmulatorError as e:
            v.fired.add("emulator")
            messages.append(str(e))
            continue
        if mem.broken_guards():
            v.fired.add("guard")
            v.notes.append(f"{where}: guards of arrays {mem.broken_guards()} overwritten")
        got = [np.array(o, copy=True) for o in outs]
        for k, (g, w) in enumerate(zip(got, expected)):
            if not _close(g, w):
                v.fired.add("reference")
                v.notes.append(f"{where}: output {k} is {g.ravel()[:6]}, expected {w.ravel()[:6]}")
        if first is None:
            first = got
        elif not all(bits_equal(a, b) for a, b in zip(first, got)):
            v.fired.add("bit-identity")
    v.message = "\n".join(dict.fromkeys(messages))
    return v


# --- the kernels the defects are injected into, with their data and expected outputs ----------


#: Row losses and splits of the fixed_sum kernels: more than its SUM_SLOTS (1024), so every slot
#: sums two items or three, and every thread of every block size fills several slots. (The
#: unpatched kernels give the same bits for any block size, so every shape is held to them.)
SUMMED = 2100


def loss_partial_case(name: str, seed: int) -> tuple[Place, list[np.ndarray]]:
    """SUMMED row losses into the 32 parts of the multi-block loss sum."""
    dtype = parse(name)[1]
    assert dtype is not None
    rows, parts = SUMMED, ck.loss_parts(SUMMED)
    row_loss = (np.random.default_rng(seed).random(rows) * 3.0).astype(dtype)
    slot = np.arange(rows) % 1024 // ck.LOSS_PART_SLOTS  # the part that sums each row
    want = np.array([math.fsum(row_loss[slot == p].astype(np.float64)) for p in range(parts)])

    def place(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
        rl, part = mem.put(row_loss), mem.put(np.full(parts, -1.0))
        return (rl, i64(rows), part), [part]

    return place, [want]


def finalize_case(name: str, seed: int) -> tuple[Place, list[np.ndarray]]:
    """The 32 parts of SUMMED row losses, scale 1/SUMMED."""
    dtype = parse(name)[1]
    assert dtype is not None
    rows = SUMMED
    partial = np.random.default_rng(seed).random(ck.loss_parts(rows)) * 3.0 * rows / 32
    want = np.array([math.fsum(partial) / rows])

    def place(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
        part, loss, st = mem.put(partial), mem.put(np.full(1, -1.0, dtype)), mem.put(status_word())
        return (part, i64(rows), np.float64(1.0 / rows), loss, st), [loss, st]

    return place, [want, status_word()]


def bias_grad_finish_case(name: str, seed: int) -> tuple[Place, list[np.ndarray]]:
    """3 columns of SUMMED splits."""
    dtype = parse(name)[1]
    assert dtype is not None
    splits, n = SUMMED, 3
    partial = np.random.default_rng(seed).normal(0.0, 1.0, (splits, n))

    def place(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
        part, dbd, st = mem.put(partial), mem.put(np.zeros(n, dtype)), mem.put(status_word())
        return (part, i64(splits), i32(n), dbd, st), [dbd, st]

    return place, [partial.sum(axis=0), status_word()]


def row_case(name: str, seed: int, rows: int = 9, n: int = 45) -> tuple[Place, list[np.ndarray]]:
    """A row kernel (one warp per row) on ``rows`` rows of ``n`` > 32 columns (every lane busy)."""
    template, dtype, params = parse(name)
    assert dtype is not None
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (rows, n)).astype(dtype)
    b = rng.normal(0.0, 1.0, n).astype(dtype)
    y = rng.random((rows, n)).astype(dtype)
    labels = rng.integers(0, n, rows).astype(np.int64)
    v = z.astype(np.float64) + b.astype(np.float64)
    if template == "bias_softmax":

        def place_softmax(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
            zd, st = mem.put(z), mem.put(status_word())
            return (zd, mem.put(b), i64(rows), i32(n), st), [zd, st]

        return place_softmax, [ref.activate(v, "softmax"), status_word()]
    if template == "argmax_accuracy":
        target = params[0]

        def place_argmax(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
            pred, st = mem.put(np.full(rows, -5, np.int64)), mem.put(status_word())
            correct = mem.put(np.zeros(1, np.uint64))
            yd = mem.put(y) if target == ck.TARGET_DENSE else NULL
            ld = mem.put(labels) if target == ck.TARGET_LABELS else NULL
            args = (mem.put(z), yd, ld, i64(rows), i32(n), pred, correct, st)
            return args, [pred, correct, st]

        want_pred = np.argmax(z, axis=1)
        truth = labels if target == ck.TARGET_LABELS else np.argmax(y, axis=1)
        hits = 0 if target == ck.TARGET_NONE else int(np.sum(want_pred == truth))
        return place_argmax, [want_pred, np.array([hits], np.uint64), status_word()]
    output, loss, use_labels = _output_of(template, params)
    if use_labels:
        Y = np.zeros((rows, n))
        Y[np.arange(rows), labels] = 1.0
    else:
        Y = y.astype(np.float64)
    delta, _ = ref.output_delta(v, Y, output, loss)
    per_row = [ref.output_delta(v[r : r + 1], Y[r : r + 1], output, loss)[1] for r in range(rows)]
    row_loss = np.array(per_row) * (2.0 if loss == "mse" else 1.0)

    def place(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
        zd, rl, st = mem.put(z), mem.put(np.full(rows, -1.0, dtype)), mem.put(status_word())
        yd = NULL if use_labels else mem.put(y)
        ld = mem.put(labels) if use_labels else NULL
        args = (zd, mem.put(b), yd, ld, i64(rows), i32(n), dtype.type(1.0 / rows), rl, st)
        return args, [zd, rl, st]

    return place, [delta, row_loss, status_word()]


def refused_launch_case(name: str, seed: int) -> tuple[Place, list[np.ndarray]]:
    """The row kernel's data, launched with 48 threads: nothing written, STATUS_LAUNCH set."""
    rows, n = 5, 7
    place, _ = row_case(name, seed, rows, n)
    probe = Memory()
    _, outs = place(probe)
    want = [np.array(o, copy=True) for o in outs]
    want[-1][ck.STATUS_LAUNCH] = 1
    return place, want


def bias_activation_case(name: str, seed: int) -> tuple[Place, list[np.ndarray]]:
    """5 rows of 3 (the scalar path) and, aligned, 4 rows of 8 (the 16-byte path): two arrays."""
    dtype = parse(name)[1]
    assert dtype is not None
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (5, 3)).astype(dtype)
    b = rng.normal(0.0, 1.0, 3).astype(dtype)

    def place(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
        zd, st = mem.put(z), mem.put(status_word())
        return (zd, mem.put(b), i64(5), i32(3), st), [zd, st]

    return place, [ref.activate(z.astype(np.float64) + b, "relu"), status_word()]


def bias_activation_vector_case(name: str, seed: int) -> tuple[Place, list[np.ndarray]]:
    dtype = parse(name)[1]
    assert dtype is not None
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (4, 8)).astype(dtype)
    b = rng.normal(0.0, 1.0, 8).astype(dtype)

    def place(mem: Memory) -> tuple[tuple[Any, ...], list[np.ndarray]]:
        zd, st = mem.put(z), mem.put(status_word())
        return (zd, mem.put(b), i64(4), i32(8), st), [zd, st]

    return place, [ref.activate(z.astype(np.float64) + b, "relu"), status_word()]


# --- the defects ------------------------------------------------------------------------------

# fixed_sum's barriers (common.cuh, inlined into each family's source): the first one, between
# the slot sums and the tree, and the one that ends each level of the tree. Without either, a
# thread reads slots another thread has not written yet in this launch, so it reads what the
# previous launch of the same library left in the __shared__ array. (Each emulator library has
# its own statics, -fno-gnu-unique: the clean kernel's launches leave nothing in the patched
# library's array.)

FIRST_BARRIER = "        shared[k] = s;\n    }\n    __syncthreads();\n"
LOOP_BARRIER = "            shared[k] += shared[k + w];\n        }\n        __syncthreads();\n"
WARP_GUARD = "    if (!whole_warps(status)) return;\n"
#: What the emulator says when half a warp leaves a shuffle: which one depends on the thread
#: order (lanes at two shuffle sites, or lanes gone while the others wait at a shuffle).
SHUFFLE_DIVERGED = (
    r"(a shuffle inside a divergent branch|returned while lanes of its warp wait at the shuffle"
    r"|names \d+ lane\(s\) of the warp that have returned)"
)
F32 = "float32"


@dataclasses.dataclass(frozen=True)
class Defect:
    id: str
    family: str
    name: str
    old: str
    new: str
    case: Callable[[str, int], tuple[Place, list[np.ndarray]]]
    caught_by: frozenset[str]  # the checks recorded as catching it (at least these fire)
    message: str = ""  # a regex the EmulatorError matches
    combos: tuple[tuple[int, int, str], ...] = COMBOS


REFUSED = ((2, 48, "forward"), (2, 48, "reverse"))

DEFECTS: list[Defect] = [
    # a. a missing __syncthreads in fixed_sum: the first barrier, and the tree's
    *[
        Defect(
            f"a-fixed_sum-{which}-barrier-{parse(name)[0]}",
            family,
            name,
            old,
            re.sub(r" *__syncthreads\(\);\n$", "", old),
            case,
            frozenset({"reference", "bit-identity"}),
        )
        for which, old in (("first", FIRST_BARRIER), ("loop", LOOP_BARRIER))
        for family, name, case in (("output_layer", ck.loss_partial(F32), loss_partial_case),)
    ],
    # ... and bias_grad_finish's barrier between the groups' sums and the columns' totals
    Defect(
        "a-groups-barrier-bias_grad_finish",
        "bias_grad",
        ck.bias_grad_finish("float64"),
        "    __syncthreads();\n    for (int lane = threadIdx.x;",
        "    for (int lane = threadIdx.x;",
        bias_grad_finish_case,
        frozenset({"reference", "bit-identity"}),
    ),
    # b. a missing partial-warp guard, launched with 48 threads
    *[
        Defect(
            f"b-no-whole_warps-{parse(name)[0]}",
            family,
            name,
            WARP_GUARD,
            "    (void)status;\n",  # (-Werror: argmax_accuracy uses status nowhere else)
            refused_launch_case,
            frozenset({"emulator"}),
            r"__shfl_xor_sync at line \d+ in a warp of 16 threads: .*lanes that do not exist",
            REFUSED,
        )
        for family, name in [
            ("bias_activation", ck.bias_softmax(F32)),
            ("output_layer", ck.output_kernel(F32, "softmax", "cross_entropy", True)),
            ("output_layer", ck.output_kernel(F32, "sigmoid", "mse", False)),
            ("output_layer", ck.output_kernel(F32, "sigmoid", "binary_cross_entropy", False)),
            ("metrics", ck.argmax_accuracy(F32, ck.TARGET_LABELS)),
        ]
    ],
    # d. an off-by-one grid-stride bound: a store past the end, a read past the end
    Defect(
        "d-scalar-bound-bias_activation",
        "bias_activation",
        ck.bias_activation(F32, "relu"),
        "i < total; i += stride",
        "i <= total; i += stride",
        bias_activation_case,
        frozenset({"guard"}),
    ),
    Defect(
        "d-vector-bound-bias_activation",
        "bias_activation",
        ck.bias_activation("float64", "relu"),
        "i < nvec; i += stride",
        "i <= nvec; i += stride",
        bias_activation_vector_case,
        frozenset({"guard"}),
    ),
    Defect(
        "d-read-bound-loss_partial",
        "output_layer",
        ck.loss_partial(F32),
        "i < count; i += SUM_SLOTS",
        "i <= count; i += SUM_SLOTS",
        loss_partial_case,
        frozenset({"reference"}),  # the NaN guard after the row losses is summed in
    ),
    # e. a shuffle inside a divergent branch
    Defect(
        "e-half-warp-skips-warp_sum-bce_loss",
        "output_layer",
        ck.output_kernel(F32, "sigmoid", "binary_cross_entropy", True),
        "        l = warp_sum(l);\n",
        "        if (lane < 16) l = warp_sum(l);\n",
        row_case,
        frozenset({"emulator"}),
        SHUFFLE_DIVERGED,
    ),
    Defect(
        "e-half-warp-skips-warp_sum-softmax_cross_entropy",
        "output_layer",
        ck.output_kernel(F32, "softmax", "cross_entropy", True),
        "        s = warp_sum(s);\n",
        "        if (lane < 16) s = warp_sum(s);\n",
        row_case,
        frozenset({"emulator"}),
        SHUFFLE_DIVERGED,
    ),
    Defect(
        "e-half-warp-skips-a-shuffle-argmax_accuracy",
        "metrics",
        ck.argmax_accuracy(F32, ck.TARGET_LABELS),
        "const T ob = __shfl_xor_sync(0xffffffffu, best, o);",
        "const T ob = lane < 16 ? __shfl_xor_sync(0xffffffffu, best, o) : best;",
        row_case,
        frozenset({"emulator"}),
        r"lanes of one warp at the shuffles of line \d+ and line \d+",
    ),
    Defect(
        # the emulator's gap: both branches reach warp_sum's one __shfl_xor_sync line, so the
        # halves of the warp exchange the values of different reductions without an error
        "e-halves-swap-two-warp_sums-softmax_cross_entropy",
        "output_layer",
        ck.output_kernel("float64", "softmax", "cross_entropy", True),
        "        s = warp_sum(s);\n        yv = warp_sum(yv);\n",
        "        if (lane < 16) { s = warp_sum(s); yv = warp_sum(yv); }\n"
        "        else { yv = warp_sum(yv); s = warp_sum(s); }\n",
        row_case,
        frozenset({"reference"}),
    ),
    # f. barriers: not reached by every thread, reached at two sites, a lane at a barrier while
    # its warp waits at a shuffle (on a GPU: a deadlock or undefined behaviour)
    Defect(
        "f-thread-0-returns-before-fixed_sum-finalize_loss",
        "output_layer",
        ck.finalize_loss("float64"),
        "    if (blockIdx.x != 0) return;\n",
        "    if (blockIdx.x != 0) return;\n    if (threadIdx.x == 0) return;\n",
        finalize_case,
        frozenset({"emulator"}),
        r"a barrier every thread does not reach",
    ),
    Defect(
        "f-barrier-in-divergent-branch-finalize_loss",
        "output_layer",
        ck.finalize_loss("float64"),
        "    if (blockIdx.x != 0) return;\n",
        "    if (blockIdx.x != 0) return;\n    if (threadIdx.x < 32) __syncthreads();\n",
        finalize_case,
        frozenset({"emulator"}),
        r"__syncthreads reached at line \d+ while others wait at line \d+",
    ),
    Defect(
        "f-lane-at-barrier-warp-at-shuffle-softmax_cross_entropy",
        "output_layer",
        ck.output_kernel("float64", "softmax", "cross_entropy", True),
        "        s = warp_sum(s);\n",
        "        if (lane == 0) __syncthreads();\n        s = warp_sum(s);\n",
        row_case,
        frozenset({"emulator"}),
        r"__syncthreads at line \d+ while lanes of the same warp wait at the shuffle",
    ),
]


def _defect_id(d: Defect) -> str:
    return f"{d.id}--caught-by-{'+'.join(sorted(d.caught_by))}"


def _patched_libraries() -> dict[str, tuple[str, ...]]:
    """Every patched source of DEFECTS -> the instantiations run from it (one library each)."""
    libs: dict[str, tuple[str, ...]] = {}
    for d in DEFECTS:
        code = patched(d.family, d.old, d.new)
        libs[code] = (*libs.get(code, ()), d.name)
    return libs


@pytest.fixture(scope="module")
def patched_libraries() -> dict[str, tuple[str, ...]]:
    """The patched libraries, built (or found in the cache) two at a time: a cold cache costs a
    compile of the emulation header for each."""
    libs = _patched_libraries()
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(_build, libs.items()))
    return libs


@pytest.mark.parametrize("defect", DEFECTS, ids=_defect_id)
def test_injected_defect_is_caught(
    defect: Defect, seed: int, patched_libraries: dict[str, tuple[str, ...]]
) -> None:
    """The unpatched kernel passes every check; the patched copy fails the recorded one(s)."""
    place, want = defect.case(defect.name, seed)
    clean = check(kernel(defect.name), place, want, defect.combos)
    assert not clean.fired, (
        f"the unpatched kernel fails {clean.fired}: {clean.message} {clean.notes}"
    )
    code = patched(defect.family, defect.old, defect.new)
    fn = _module(code, patched_libraries[code]).get_function(defect.name)
    v = check(fn, place, want, defect.combos)
    assert v.fired, f"{defect.id}: no check caught the injected defect"
    assert defect.caught_by <= v.fired, (
        f"{defect.id}: caught by {sorted(v.fired)}, recorded as {sorted(defect.caught_by)}\n"
        f"{v.message}\n{v.notes[:4]}"
    )
    if defect.message:
        assert re.search(defect.message, v.message), v.message


def test_every_defect_class_is_injected() -> None:
    classes = {d.id.split("-")[0] for d in DEFECTS} | {c[0].split("-")[0] for c in SANITIZED}
    assert classes == set("abcdef")


# --- sanitizers: the ASan+UBSan build in a subprocess -----------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np

    from gpubp import reference as ref
    from cudaemu.kernels import Module

    code, name, kind = Path(sys.argv[1]).read_text(), sys.argv[2], sys.argv[3]
    names = sys.argv[4].split(";")  # every instantiation the library exports
    fn = Module(code, names, variant="asan").get_function(name)
    dt = np.float32 if "<float" in name else np.float64
    rng = np.random.default_rng(5)
    status = np.zeros(4, np.int32)

    def offset(values):  # one element past NumPy's (16-byte aligned) allocation
        out = np.empty(values.size + 1, values.dtype)[1:].reshape(values.shape)
        out[...] = values
        return out

    if kind == "misaligned-bias_activation":  # 16-byte path possible (n = 8), views offset
        z0 = rng.normal(size=(3, 8)).astype(dt)
        b0 = rng.normal(size=8).astype(dt)
        z, b = offset(z0), offset(b0)
        fn((2,), (64,), (z, b, np.int64(3), np.int32(8), status))
        want = ref.activate(z0.astype(np.float64) + b0, "tanh")
    elif kind == "misaligned-hidden_delta":
        g0 = rng.normal(size=24).astype(dt)
        a0 = ref.activate(rng.normal(size=24), "sigmoid").astype(dt)
        g, a = offset(g0), offset(a0)
        fn((2,), (64,), (g, a, np.int64(24), status))
        z, want = g, g0 * ref.derivative_from_output(a0, "sigmoid")
    elif kind == "exact-bias_activation":  # arrays of exactly their size: ASan's redzone follows
        z0 = rng.normal(size=(5, 3)).astype(dt)
        b = rng.normal(size=3).astype(dt)
        z = z0.copy()
        fn((2,), (64,), (z, b, np.int64(5), np.int32(3), status))
        want = ref.activate(z0.astype(np.float64) + b, "relu")
    else:
        raise SystemExit(f"unknown kind {kind}")
    err = np.max(np.abs(z - want)) / np.max(np.abs(want))
    assert err < 2e-5 and not status.any(), (err, status)
    print("clean run", kind)
    """
)

SANITIZED: list[tuple[str, str, str, str, str, str]] = [
    # (id, family, name, old, new, kind): caught by UBSan (misaligned) or ASan (overflow)
    (
        "c-no-aligned16-bias_activation--caught-by-ubsan-misaligned",
        "bias_activation",
        ck.bias_activation(F32, "tanh"),
        "if (n % V == 0 && aligned16(z) && aligned16(b)) {",
        "if (n % V == 0) {",
        "misaligned-bias_activation",
    ),
    (
        "c-no-aligned16-hidden_delta--caught-by-ubsan-misaligned",
        "hidden_delta",
        ck.hidden_delta("float64", "sigmoid"),
        "if (aligned16(g) && aligned16(a)) {",
        "if (true) {",
        "misaligned-hidden_delta",
    ),
    (
        "d-scalar-bound-bias_activation--caught-by-asan-heap-buffer-overflow",
        "bias_activation",
        ck.bias_activation(F32, "relu"),
        "i < total; i += stride",
        "i <= total; i += stride",
        "exact-bias_activation",
    ),
]
_REPORT = {"misaligned": r"runtime error: .*misaligned address", "exact": r"heap-buffer-overflow"}


def _sanitized_run(
    code: str, names: Sequence[str], name: str, kind: str, tmp: Path
) -> subprocess.CompletedProcess[str]:
    runtime = emu.sanitizer_runtime("asan")
    if runtime is None:
        why = f"the asan runtime of {emu.compiler()} is not installed"
        if os.environ.get("GPUBP_REQUIRE_EMULATOR") == "1":
            pytest.fail(f"GPUBP_REQUIRE_EMULATOR=1, but {why}")
        pytest.skip(why)
    src = tmp / f"{kind}.cu"
    src.write_text(code, encoding="utf-8")
    script = tmp / "run.py"
    script.write_text(_SCRIPT, encoding="utf-8")
    env = {
        **os.environ,
        "GPUBP_EMU_VARIANT": "asan",
        "LD_PRELOAD": runtime,
        "ASAN_OPTIONS": "detect_leaks=0",
        "UBSAN_OPTIONS": "print_stacktrace=0",
        # the gpubp under test, not whatever an installed copy left in site-packages
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    return subprocess.run(
        [sys.executable, str(script), str(src), name, kind, ";".join(names)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(("case"), SANITIZED, ids=[c[0] for c in SANITIZED])
def test_sanitizers_catch_injected_defect(case: tuple[str, ...], tmp_path: Path) -> None:
    """The unpatched kernel runs clean under ASan+UBSan; the patched copy dies with the report."""
    _, family, name, old, new, kind = case
    # the unpatched library is the whole family's, as the ASan run of the kernel tests builds it
    clean = _sanitized_run(ck.source(family), ck.name_expressions(family), name, kind, tmp_path)
    assert clean.returncode == 0 and "clean run" in clean.stdout, clean.stderr[-3000:]
    bad = _sanitized_run(patched(family, old, new), [name], name, kind, tmp_path)
    assert bad.returncode != 0, f"the sanitizers did not stop the run:\n{bad.stdout}{bad.stderr}"
    assert re.search(_REPORT[kind.split("-")[0]], bad.stderr), bad.stderr[-3000:]
