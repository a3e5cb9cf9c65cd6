"""The CUDA kernels as the host sees them: sources, every instantiation by name, launch plans.

Pure Python and NumPy (no CuPy, no GPU), so the catalogue, the sources and the launch plans are
checked on any machine: the NVRTC compile test compiles exactly :func:`name_expressions` of every
family, and :class:`gpubp.backends.cuda.CupyBackend` asks only for names built by the
functions below, which raise for anything the catalogue does not hold.

The numbers mirrored from ``kernels/common.cuh`` (status slots, hyper-parameter slots, target
kinds, table columns) are checked against the header by a test.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from ... import activations as act
from ...kernel_sources import read_kernel
from ...optim import adam_scalars
from ...schedules import FORMULAS

#: Kernel family -> CUDA source file (one file per family).
FAMILIES: dict[str, str] = {
    "bias_activation": "bias_activation.cu",
    "hidden_delta": "hidden_delta.cu",
    "output_layer": "output_layer.cu",
    "bias_grad": "bias_grad.cu",
    "optimizers": "optimizers.cu",
    "guard": "guard.cu",
    "metrics": "metrics.cu",
    "sparse": "sparse.cu",
}

CUDA_TYPES: dict[str, str] = {"float32": "float", "float64": "double"}

# --- mirrored from kernels/common.cuh -------------------------------------------------------------
STATUS_BAD, STATUS_SKIPPED, STATUS_LAUNCH, STATUS_SLOTS = 0, 1, 2, 4
HP = {
    "LR": 0,
    "MOMENTUM": 1,
    "WEIGHT_DECAY": 2,
    "BETA1": 3,
    "BETA2": 4,
    "EPS": 5,
    "ALPHA": 6,
    "EPS_HAT": 7,
    "DECAY": 8,
    "LR_MOMENTUM": 9,
    "NEG_LR": 10,
    "ONE": 11,
    "ZERO": 12,
    "ONE_MINUS_BETA1": 13,
    "ONE_MINUS_BETA2": 14,
}
HP_SLOTS = 16
SCHED = {"KIND": 0, "LR": 1, "STEPS": 2, "SCALED_DECAY": 3}
SCHED_SLOTS = 4
TARGET_DENSE, TARGET_LABELS, TARGET_NONE = 0, 1, 2
TAB_PARAM, TAB_GRAD, TAB_STATE1, TAB_STATE2, TAB_SIZE, TAB_CHUNK0, TABLE_COLS = range(7)
# (the bias-gradient layer table's columns, from kernels/bias_grad.cu)
BIAS_DELTA, BIAS_DB, BIAS_ROWS, BIAS_N, BIAS_PER, BIAS_SPLITS, BIAS_ITEM0, BIAS_TILE0 = range(8)
BIAS_COLS = 8

#: Block size of every launch (a multiple of 32: the row kernels give one warp to a row).
THREADS = 256
#: Elements per chunk of the optimizer table kernels (a multiple of every vector width).
CHUNK = 4096


# --- names of the instantiations --------------------------------------------------------------


def _ctype(dtype: object) -> str:
    name = np.dtype(dtype).name  # type: ignore[call-overload]
    if name not in CUDA_TYPES:
        raise ValueError(f"dtype {name} has no CUDA kernels; expected float32 or float64")
    return CUDA_TYPES[name]


def _act_id(name: str, allowed: Sequence[str]) -> int:
    if name not in allowed:
        raise ValueError(f"activation {name!r} has no kernel here; expected one of {allowed}")
    return act.ACTIVATION_IDS[name]


def _target(labels: bool) -> int:
    return TARGET_LABELS if labels else TARGET_DENSE


def bias_activation(dtype: object, activation: str) -> str:
    """``z = f(z + b)`` in place; ``activation`` is elementwise (softmax: :func:`bias_softmax`)."""
    return f"gpubp::bias_activation<{_ctype(dtype)}, {_act_id(activation, ELEMENTWISE)}>"


def bias_softmax(dtype: object) -> str:
    return f"gpubp::bias_softmax<{_ctype(dtype)}>"


def hidden_delta(dtype: object, activation: str) -> str:
    return f"gpubp::hidden_delta<{_ctype(dtype)}, {_act_id(activation, act.HIDDEN_ACTIVATIONS)}>"


def output_kernel(dtype: object, output: str, loss: str, labels: bool) -> str:
    """The output-layer kernel for ``(output, loss)``; ``labels``: targets are int64 labels."""
    t, tgt = _ctype(dtype), _target(labels)
    if loss == "cross_entropy" and output == "softmax":
        return f"gpubp::softmax_cross_entropy<{t}, {tgt}>"
    if loss == "binary_cross_entropy" and output == "sigmoid":
        return f"gpubp::bce_loss<{t}, {tgt}>"
    if loss == "poisson" and output == "exp":
        return f"gpubp::poisson_loss<{t}, {tgt}>"
    if loss == "mse":
        return f"gpubp::mse_loss<{t}, {_act_id(output, act.OUTPUT_ACTIVATIONS)}, {tgt}>"
    raise ValueError(f"loss {loss!r} is not defined for output {output!r}")


def loss_partial(dtype: object) -> str:
    return f"gpubp::loss_partial<{_ctype(dtype)}>"


def finalize_loss(dtype: object) -> str:
    return f"gpubp::finalize_loss<{_ctype(dtype)}>"


def record_loss(dtype: object) -> str:
    return f"gpubp::record_loss<{_ctype(dtype)}>"


def bias_grad_partial(dtype: object) -> str:
    return f"gpubp::bias_grad_partial<{_ctype(dtype)}>"


def bias_grad_finish(dtype: object) -> str:
    return f"gpubp::bias_grad_finish<{_ctype(dtype)}>"


def bias_grad_partial_layers(dtype: object) -> str:
    """:func:`bias_grad_partial` of every layer of a layer table (:func:`bias_table`)."""
    return f"gpubp::bias_grad_partial_layers<{_ctype(dtype)}>"


def bias_grad_finish_layers(dtype: object) -> str:
    """:func:`bias_grad_finish` of every layer of a layer table (:func:`bias_table`)."""
    return f"gpubp::bias_grad_finish_layers<{_ctype(dtype)}>"


def sgd_update_table(dtype: object, momentum: bool, nesterov: bool) -> str:
    if nesterov and not momentum:
        raise ValueError("Nesterov momentum needs momentum > 0")
    return f"gpubp::sgd_update_table<{_ctype(dtype)}, {int(momentum)}, {int(nesterov)}>"


def adam_update_table(dtype: object, decoupled: bool) -> str:
    return f"gpubp::adam_update_table<{_ctype(dtype)}, {int(decoupled)}>"


def sgd_check_table(dtype: object, momentum: bool, nesterov: bool) -> str:
    return sgd_update_table(dtype, momentum, nesterov).replace("_update_", "_check_")


def adam_check_table(dtype: object, decoupled: bool) -> str:
    return adam_update_table(dtype, decoupled).replace("_update_", "_check_")


def update_table(op: str, dtype: object, variant: tuple[bool, ...], check: bool = False) -> str:
    """The table kernel of the optimizer op ``op`` (``optim.Optimizer.op``) in its ``variant``:
    the update, or with ``check`` the kernel that flags a non-finite new value first."""
    tables: dict[str, Callable[..., str]] = {
        "sgd_update": sgd_check_table if check else sgd_update_table,
        "adam_update": adam_check_table if check else adam_update_table,
    }
    return tables[op](dtype, *variant)


def adam_step_scalars(dtype: object) -> str:
    """Adam's ``alpha`` and ``eps_hat`` from the device step counter (``optim.adam_scalars``)."""
    return f"gpubp::adam_step_scalars<{_ctype(dtype)}>"


def schedule_lr(dtype: object) -> str:
    """A schedule's learning rate from the device's global step counter (``schedules``)."""
    return f"gpubp::schedule_lr<{_ctype(dtype)}>"


def count_step() -> str:
    """The device step counter advanced after an update that was not skipped."""
    return "gpubp::count_step"


def check_finite_table(dtype: object) -> str:
    return f"gpubp::check_finite_table<{_ctype(dtype)}>"


def zero_if_bad_table(dtype: object) -> str:
    return f"gpubp::zero_if_bad_table<{_ctype(dtype)}>"


def finish_step() -> str:
    return "gpubp::finish_step"


def argmax_accuracy(dtype: object, target: int) -> str:
    if target not in (TARGET_DENSE, TARGET_LABELS, TARGET_NONE):
        raise ValueError(f"target kind {target} is not one of 0 (dense), 1 (labels), 2 (none)")
    return f"gpubp::argmax_accuracy<{_ctype(dtype)}, {target}>"


def threshold_accuracy(dtype: object) -> str:
    return f"gpubp::threshold_accuracy<{_ctype(dtype)}>"


def csr_dense(dtype: object) -> str:
    """CSR ``(rows, K)`` times dense ``(K, n)``: the first layer's products on sparse input."""
    return f"gpubp::csr_dense<{_ctype(dtype)}>"


ELEMENTWISE: tuple[str, ...] = tuple(a for a in act.ACTIVATION_IDS if a != "softmax")
_DTYPES = tuple(CUDA_TYPES)


def _catalogue() -> dict[str, list[str]]:
    """Every instantiation, by family: the products of the builders over all their arguments."""
    flags = (False, True)
    cat: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for dt in _DTYPES:
        cat["bias_activation"] += [bias_activation(dt, a) for a in ELEMENTWISE]
        cat["bias_activation"].append(bias_softmax(dt))
        cat["hidden_delta"] += [hidden_delta(dt, a) for a in act.HIDDEN_ACTIVATIONS]
        for labels in flags:
            cat["output_layer"].append(output_kernel(dt, "softmax", "cross_entropy", labels))
            cat["output_layer"].append(output_kernel(dt, "sigmoid", "binary_cross_entropy", labels))
            cat["output_layer"].append(output_kernel(dt, "exp", "poisson", labels))
            cat["output_layer"] += [
                output_kernel(dt, o, "mse", labels) for o in act.OUTPUT_ACTIVATIONS
            ]
        cat["output_layer"] += [loss_partial(dt), finalize_loss(dt), record_loss(dt)]
        cat["bias_grad"].append(bias_grad_partial(dt))
        cat["bias_grad"].append(bias_grad_finish(dt))
        cat["bias_grad"] += [bias_grad_partial_layers(dt), bias_grad_finish_layers(dt)]
        cat["optimizers"] += [
            sgd_update_table(dt, m, n) for m, n in itertools.product(flags, flags) if m or not n
        ]
        cat["optimizers"] += [adam_update_table(dt, d) for d in flags]
        cat["optimizers"] += [
            sgd_check_table(dt, m, n) for m, n in itertools.product(flags, flags) if m or not n
        ]
        cat["optimizers"] += [adam_check_table(dt, d) for d in flags]
        cat["optimizers"] += [adam_step_scalars(dt), schedule_lr(dt)]
        cat["guard"] += [check_finite_table(dt), zero_if_bad_table(dt)]
        cat["metrics"] += [
            argmax_accuracy(dt, t) for t in (TARGET_DENSE, TARGET_LABELS, TARGET_NONE)
        ]
        cat["metrics"].append(threshold_accuracy(dt))
        cat["sparse"].append(csr_dense(dt))
    cat["guard"].append(finish_step())
    cat["optimizers"].append(count_step())
    return cat


_CATALOGUE = _catalogue()


def name_expressions(family: str) -> list[str]:
    """Every instantiation of ``family`` that the backend may ask for, in a fixed order."""
    if family not in FAMILIES:
        raise ValueError(f"kernel family {family!r} is not known; expected one of {list(FAMILIES)}")
    return list(_CATALOGUE[family])


def family_of(name: str) -> str:
    """The family whose module holds the instantiation ``name``."""
    for family, names in _CATALOGUE.items():
        if name in names:
            return family
    raise KeyError(f"{name!r} is not an instantiation in the kernel catalogue")


def kernel_templates(family: str) -> list[str]:
    """Names of the ``__global__`` functions defined in ``family``'s source file."""
    src = read_kernel(FAMILIES[family])
    return re.findall(r"__global__\s+void\s+(\w+)\s*\(", src)


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def source(family: str) -> str:
    """The family's source with its local ``#include "..."`` headers inlined (each once).

    One self-contained text, so NVRTC needs no include path and an installed package (where the
    kernels may live inside a zip) compiles the same way as a checkout.
    """
    if family not in FAMILIES:
        raise ValueError(f"kernel family {family!r} is not known; expected one of {list(FAMILIES)}")
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        # "#pragma once" is dropped: each header is inlined once anyway, and a host compiler
        # warns about it in a main file (the nvcc register check compiles this same text)
        text = re.sub(r"^\s*#\s*pragma\s+once\s*$", "", read_kernel(name), flags=re.M)
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(FAMILIES[family])


#: NVRTC options used for every family (C++17 for ``if constexpr``).
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17",)


# --- launch plans -------------------------------------------------------------------------------


def blocks_for(work_items: int, threads: int = THREADS, max_blocks: int = 65536) -> int:
    """Blocks for ``work_items`` grid-stride items (at least 1, at most ``max_blocks``)."""
    return max(1, min(max_blocks, math.ceil(max(work_items, 1) / threads)))


#: Slots of the fixed-order sum per part of the multi-block loss sum (``LOSS_PART_SLOTS`` of
#: ``kernels/output_layer.cu``), and the parts at most (the float64 scratch it needs).
LOSS_PART_SLOTS = 32
LOSS_PARTS = 1024 // LOSS_PART_SLOTS
#: Slot groups per column of ``bias_grad_finish`` (``BIAS_GROUPS``): its block is 32 columns
#: by this many groups.
BIAS_GROUPS = 8


def loss_parts(rows: int) -> int:
    """Parts of the multi-block loss sum of ``rows`` row losses (``loss_parts`` of the kernel)."""
    span = 1
    while span < 1024 and span < rows:
        span *= 2
    return max(1, span // LOSS_PART_SLOTS)


def reduction_threads(items: int, threads: int = THREADS) -> int:
    """Threads a block for a block-wide sum of ``items`` values: a whole number of warps, no
    more than ``threads`` (a block of idle threads would only add barrier rounds)."""
    return max(32, min(threads, 32 * math.ceil(max(items, 1) / 32)))


def row_blocks(rows: int, threads: int = THREADS, max_blocks: int = 65536) -> int:
    """Blocks for the row kernels: one warp per row."""
    return blocks_for(rows, threads // 32, max_blocks)


def bias_grad_plan(rows: int, n: int, target_threads: int = 1 << 18) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of the bias-gradient column sum of a ``(rows, n)`` delta.

    Enough ``(split, column)`` threads to fill a large GPU, with at least 32 rows summed by each;
    the plan depends only on the shape, so the result is the same on every run.
    """
    if rows < 1 or n < 1:
        raise ValueError(f"bias_grad_plan needs a non-empty delta, got ({rows}, {n})")
    wanted = max(1, target_threads // n)
    rows_per_split = max(32, math.ceil(rows / wanted))
    splits = math.ceil(rows / rows_per_split)
    return splits, rows_per_split


def bias_table(
    layers: Sequence[tuple[int, int, int, int]],
) -> tuple[np.ndarray, int, int, int]:
    """The int64 layer table of ``bias_grad_partial_layers`` and ``bias_grad_finish_layers``.

    ``layers``: per layer ``(delta_ptr, db_ptr, rows, n)`` of a ``(rows, n)`` delta and its
    ``(n,)`` bias gradient. Each layer keeps its own :func:`bias_grad_plan` (so its bits are
    the one-layer kernels'); its partial sums follow the layers before it (``BIAS_ITEM0``: the
    sum of their ``splits * n``), as do its tiles of 32 columns (``BIAS_TILE0``). Returns
    ``(table, items, tiles, threads)``: the partial sums in all (the float64 scratch needed),
    the tiles in all, and the finish kernel's block size (the widest layer's).
    """
    if not layers:
        raise ValueError("a bias-gradient layer table needs at least one layer")
    table = np.zeros((len(layers), BIAS_COLS), dtype=np.int64)
    items = tiles = 0
    threads = 32
    for k, (delta, db, rows, n) in enumerate(layers):
        splits, per = bias_grad_plan(rows, n)
        table[k] = (delta, db, rows, n, per, splits, items, tiles)
        items += splits * n
        tiles += -(-n // 32)
        threads = max(threads, 32 * min(BIAS_GROUPS, reduction_threads(splits) // 32))
    return table, items, tiles, threads


def build_table(
    entries: Sequence[tuple[int, int, int, int, int]], chunk: int = CHUNK
) -> tuple[np.ndarray, int]:
    """The int64 table the one-launch optimizer and guard kernels read, and the chunk count.

    ``entries``: per tensor ``(param_ptr, grad_ptr, state1_ptr, state2_ptr, size)`` (0 for an
    unused state). Row ``t`` gets the index of its first chunk (``TAB_CHUNK0``); tensor ``t``
    covers ``ceil(size_t / chunk)`` chunks, so every chunk begins at a multiple of ``chunk``
    elements inside one tensor.
    """
    if chunk < 1 or chunk % 4:
        raise ValueError(f"chunk must be a positive multiple of 4 elements, got {chunk}")
    table = np.zeros((len(entries), TABLE_COLS), dtype=np.int64)
    first = 0
    for t, (p, g, s1, s2, size) in enumerate(entries):
        if size < 1:
            raise ValueError(f"tensor {t} of the update table is empty")
        table[t, :TAB_CHUNK0] = (p, g, s1, s2, size)
        table[t, TAB_CHUNK0] = first
        first += math.ceil(size / chunk)
    return table, first


def hyperparameters(
    optimizer: object, step: int, dtype: object, lr: float | None = None
) -> np.ndarray:
    """The ``HP_SLOTS`` hyper-parameter block for ``optimizer`` at step ``step`` (1 first), with
    learning rate ``lr`` (default: the optimizer's).

    Derived values are computed in float64 and rounded once to ``dtype``, as the NumPy backend's
    Python-float scalars are.
    """
    if lr is None:
        lr = float(getattr(optimizer, "lr"))  # noqa: B009 - optimizer is any gpubp.optim object
    wd = float(getattr(optimizer, "weight_decay", 0.0))
    hp = np.zeros(HP_SLOTS, dtype=np.float64)
    hp[HP["LR"]] = lr
    hp[HP["WEIGHT_DECAY"]] = wd
    hp[HP["NEG_LR"]] = -lr
    hp[HP["ONE"]] = 1.0
    hp[HP["ZERO"]] = 0.0
    hp[HP["DECAY"]] = 1.0 - lr * wd
    if getattr(optimizer, "kind", "") == "sgd":
        mu = float(getattr(optimizer, "momentum", 0.0))
        hp[HP["MOMENTUM"]] = mu
        hp[HP["LR_MOMENTUM"]] = lr * mu
    else:
        b1, b2 = (float(b) for b in getattr(optimizer, "betas"))  # noqa: B009
        eps = float(getattr(optimizer, "eps"))  # noqa: B009
        decoupled = bool(getattr(optimizer, "decoupled", False))
        k = adam_scalars(step, lr, b1, b2, eps, wd, decoupled)  # as NumPy's and Numba's Adam
        hp[HP["BETA1"]], hp[HP["BETA2"]] = k.b1, k.b2
        hp[HP["ONE_MINUS_BETA1"]], hp[HP["ONE_MINUS_BETA2"]] = k.omb1, k.omb2
        hp[HP["EPS"]] = eps
        hp[HP["ALPHA"]], hp[HP["EPS_HAT"]] = k.alpha, k.eps_hat
        hp[HP["DECAY"]] = k.shrink
    return np.asarray(hp, dtype=np.dtype(dtype))  # type: ignore[call-overload]


def device_schedule(optimizer: object) -> tuple[object, int] | None:
    """``(schedule, step)`` where ``optimizer`` follows a schedule that is a closed formula
    (:meth:`gpubp.optim.Optimizer.follow`) and its ``lr`` is that schedule's rate of ``step``
    (so the device computes the rate it would be given); else ``None`` (the host's rate)."""
    schedule = getattr(optimizer, "schedule", None)
    step = getattr(optimizer, "schedule_step", None)
    if schedule is None or step is None or getattr(schedule, "kind", None) not in FORMULAS:
        return None
    if getattr(schedule, "at")(step) != getattr(optimizer, "lr"):  # noqa: B009
        return None  # the rate was set by hand since
    return schedule, int(step)


def schedule_block(optimizer: object, schedule: object | None) -> np.ndarray:
    """The float64 ``SCHED_SLOTS`` block ``schedule_lr`` computes ``optimizer``'s rate from:
    ``schedule``'s (a :class:`gpubp.schedules.Schedule` of :data:`FORMULAS`), or with ``None``
    the host's rate kept."""
    block = np.zeros(SCHED_SLOTS, dtype=np.float64)
    if schedule is not None:
        block[SCHED["KIND"]] = FORMULAS[getattr(schedule, "kind")]  # noqa: B009
        block[SCHED["LR"]] = float(getattr(schedule, "lr"))  # noqa: B009
        block[SCHED["STEPS"]] = float(getattr(schedule, "steps"))  # noqa: B009
        sgd = getattr(optimizer, "kind", "") == "sgd"
        block[SCHED["SCALED_DECAY"]] = float(sgd or bool(getattr(optimizer, "decoupled", False)))
    return block
