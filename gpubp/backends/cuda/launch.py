"""One public wrapper per kernel family: check the arrays, then launch (as thinc's
``_custom_kernels.py`` does).

Every wrapper takes ``kernels``, a getter from an instantiation name (built by :mod:`.catalogue`)
to a launchable ``fn((blocks,), (threads,), args)`` (a ``cupy.RawKernel``, or a stand-in's;
:class:`.context.Kernels`, whose getter for the current device is ``CupyBackend.kernel``). The
checks (dtype, C-contiguity, shapes) raise :class:`TypeError` or :class:`ValueError` saying what
was expected; they cost no device work and no synchronisation, so the wrappers may be called
while a stream is capturing. Arrays are device arrays (anything with ``dtype``, ``shape``,
``flags`` that the launcher accepts); ``status`` is the int32 status word of ``STATUS_SLOTS``
slots (``kernels/common.cuh``), ``hp`` a block of ``HP_SLOTS`` values of the parameters' dtype.
Every launch has ``THREADS`` threads a block unless said; the kernels use grid-stride loops, so
the number of blocks tunes speed and never decides correctness.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import catalogue as ck

#: Instantiation name -> launchable kernel.
KernelGetter = Callable[[str], Any]

_NULL = np.uint64(0)  # a null pointer argument


# --- checks ---------------------------------------------------------------------------------------


def _shape_text(shape: tuple[int | None, ...]) -> str:
    parts = ["any" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def check_array(
    fn: str,
    what: str,
    a: Any,
    dtype: Any,
    shape: tuple[int | None, ...] | None = None,
) -> None:
    """Raise unless ``a`` is a C-contiguous array of ``dtype`` and ``shape`` (None: any)."""
    if not (hasattr(a, "dtype") and hasattr(a, "flags") and hasattr(a, "shape")):
        raise TypeError(f"{fn}: {what} must be a device array, got {type(a).__name__}")
    want = np.dtype(dtype)
    if a.dtype != want:
        raise TypeError(f"{fn}: {what} is {a.dtype}; expected {want.name}")
    if shape is not None:
        got = tuple(a.shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise ValueError(f"{fn}: {what} has shape {got}; expected {_shape_text(shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{fn}: {what} must be C-contiguous (use ascontiguousarray)")


def float_array(fn: str, what: str, a: Any, ndim: int) -> Any:
    """The dtype of ``a``, checked to be float32 or float64, ``ndim``-D and C-contiguous."""
    dt = getattr(a, "dtype", None)
    if dt is None or np.dtype(dt).name not in ck.CUDA_TYPES:
        raise TypeError(f"{fn}: {what} is {dt}; expected a float32 or float64 array")
    check_array(fn, what, a, dt, (None,) * ndim)
    return dt


def check_status_block(fn: str, status: Any) -> None:
    """Raise unless ``status`` is the step's int32 status block."""
    check_array(fn, "status", status, np.int32, (ck.STATUS_SLOTS,))


def check_hp_block(fn: str, hp: Any, dtype: Any) -> None:
    """Raise unless ``hp`` is a hyper-parameter block of ``dtype``."""
    check_array(fn, "hp", hp, dtype, (ck.HP_SLOTS,))


def launch_kernel(
    kernels: KernelGetter,
    name: str,
    blocks: int,
    args: tuple[Any, ...],
    threads: int = ck.THREADS,
) -> None:
    """Launch kernel ``name`` on ``blocks`` blocks of ``threads`` threads with ``args``."""
    kernels(name)((blocks,), (threads,), args)


# --- bias_activation.cu ---------------------------------------------------------------------------


def bias_activation(kernels: KernelGetter, z: Any, b: Any, activation: str, status: Any) -> None:
    """``z = f(z + b)`` in place: ``z`` ``(rows, n)``, ``b`` ``(n,)``; softmax by row too.

    A NaN or infinity in the result sets ``status[STATUS_BAD]``.
    """
    if activation == "softmax":
        bias_softmax(kernels, z, b, status)
        return
    dt = float_array("bias_activation", "z", z, 2)
    rows, n = z.shape
    check_array("bias_activation", "b", b, dt, (n,))
    check_status_block("bias_activation", status)
    launch_kernel(
        kernels,
        ck.bias_activation(dt, activation),
        ck.blocks_for(rows * n // (16 // dt.itemsize) + 1),
        (z, b, np.int64(rows), np.int32(n), status),
    )


def bias_softmax(kernels: KernelGetter, z: Any, b: Any, status: Any) -> None:
    """``z = softmax(z + b)`` by row, in place: ``z`` ``(rows, n)``, ``b`` ``(n,)``."""
    dt = float_array("bias_softmax", "z", z, 2)
    rows, n = z.shape
    check_array("bias_softmax", "b", b, dt, (n,))
    check_status_block("bias_softmax", status)
    launch_kernel(
        kernels,
        ck.bias_softmax(dt),
        ck.row_blocks(rows),
        (z, b, np.int64(rows), np.int32(n), status),
    )


# --- hidden_delta.cu ------------------------------------------------------------------------------


def hidden_delta(kernels: KernelGetter, g: Any, a: Any, activation: str, status: Any) -> None:
    """``g *= f'(a)`` in place, ``f'`` written through the activation's output ``a``.

    ``g`` and ``a`` are ``(rows, n)`` of one dtype (``g = delta_next @ W_next`` beforehand).
    """
    dt = float_array("hidden_delta", "g", g, 2)
    check_array("hidden_delta", "a", a, dt, tuple(g.shape))
    check_status_block("hidden_delta", status)
    launch_kernel(
        kernels,
        ck.hidden_delta(dt, activation),
        ck.blocks_for(g.size // (16 // dt.itemsize) + 1),
        (g, a, np.int64(g.size), status),
    )


# --- output_layer.cu ------------------------------------------------------------------------------


def output_layer(
    kernels: KernelGetter,
    z: Any,
    b: Any,
    y: Any,
    labels: Any,
    output: str,
    loss: str,
    row_loss: Any,
    loss_out: Any,
    status: Any,
    *,
    partial: Any,
) -> None:
    """Output layer and loss in one row kernel, then the fixed-order loss total.

    In place, ``z`` ``(rows, n)``: ``z + b`` (``b`` ``(n,)``, or ``None`` when already added),
    the output activation, the loss of each row into ``row_loss`` ``(rows,)`` and
    ``delta^L = dC/dz`` (averaged over rows) back into ``z``. Targets: ``y`` ``(rows, n)``
    dense (same dtype) or ``labels`` ``(rows,)`` int64, exactly one of them. Then
    ``loss_out`` ``(1,)`` = the mean loss (:func:`finalize_loss`, through the float64 scratch
    ``partial``).
    """
    fn = "output_layer"
    dt = float_array(fn, "z", z, 2)
    rows, n = z.shape
    if b is not None:
        check_array(fn, "b", b, dt, (n,))
    if (y is None) == (labels is None):
        raise ValueError(f"{fn}: give exactly one of y (dense targets) and labels")
    if y is not None:
        check_array(fn, "y", y, dt, (rows, n))
    else:
        check_array(fn, "labels", labels, np.int64, (rows,))
    check_array(fn, "row_loss", row_loss, dt, (rows,))
    check_status_block(fn, status)
    launch_kernel(
        kernels,
        ck.output_kernel(dt, output, loss, labels is not None),
        ck.row_blocks(rows),
        (
            z,
            _NULL if b is None else b,
            _NULL if y is None else y,
            _NULL if labels is None else labels,
            np.int64(rows),
            np.int32(n),
            dt.type(1.0 / rows),
            row_loss,
            status,
        ),
    )
    scale = 1.0 / (2 * rows) if loss == "mse" else 1.0 / rows
    finalize_loss(kernels, row_loss, loss_out, scale, status, partial)


def finalize_loss(
    kernels: KernelGetter, row_loss: Any, loss_out: Any, scale: float, status: Any, partial: Any
) -> None:
    """``loss_out[0] = scale * sum(row_loss)`` in common.cuh's fixed order (float64 sums).

    Two launches: ``loss_partial``, one block per part of :data:`.catalogue.LOSS_PART_SLOTS`
    slots, writes the parts' sums to ``partial`` (float64, at least
    :func:`.catalogue.loss_parts` values); ``finalize_loss``, one block, adds them: the bits of
    one block summing everything. ``row_loss`` ``(rows,)``, ``loss_out`` ``(1,)`` of the same
    dtype; a non-finite total sets ``status[STATUS_BAD]``.
    """
    fn = "finalize_loss"
    dt = float_array(fn, "row_loss", row_loss, 1)
    check_array(fn, "loss_out", loss_out, dt, (1,))
    check_array(fn, "partial", partial, np.float64, (None,))
    rows = int(row_loss.shape[0])
    parts = ck.loss_parts(rows)
    if partial.size < parts:
        raise ValueError(f"{fn}: partial holds {partial.size} values; expected >= {parts}")
    check_status_block(fn, status)
    threads = ck.reduction_threads(min(rows, ck.LOSS_PART_SLOTS))
    launch_kernel(kernels, ck.loss_partial(dt), parts, (row_loss, np.int64(rows), partial), threads)
    launch_kernel(
        kernels,
        ck.finalize_loss(dt),
        1,
        (partial, np.int64(rows), np.float64(scale), loss_out, status),
        ck.reduction_threads(parts),
    )


def record_loss(kernels: KernelGetter, loss: Any, weight: float, ledger: Any) -> None:
    """Append the step's loss ``loss`` ``(1,)`` to the loss ledger ``ledger`` (int64 ``(3,)``:
    the current block's pointer, the slots used, the running float64 total's pointer): into
    the block's next slot, and ``weight * loss`` into the total (one thread)."""
    dt = float_array("record_loss", "loss", loss, 1)
    check_array("record_loss", "loss", loss, dt, (1,))
    check_array("record_loss", "ledger", ledger, np.int64, (3,))
    launch_kernel(kernels, ck.record_loss(dt), 1, (loss, np.float64(weight), ledger), 32)


# --- bias_grad.cu ---------------------------------------------------------------------------------


def bias_grad(
    kernels: KernelGetter,
    delta: Any,
    db: Any,
    partial: Any,
    plan: tuple[int, int],
    status: Any,
) -> None:
    """``db = sum over rows of delta``: ``delta`` ``(rows, n)`` -> ``db`` ``(n,)``.

    ``plan = (splits, rows_per_split)`` from :func:`.catalogue.bias_grad_plan`; ``partial``:
    float64 scratch of at least ``splits * n``. Two launches: partial column sums by
    ``(split, column)``, then their fixed-order total (the same bits for any launch shape); a
    column sum that is not finite sets ``status[STATUS_BAD]``.
    """
    fn = "bias_grad"
    dt = float_array(fn, "delta", delta, 2)
    rows, n = delta.shape
    splits, per = plan
    if splits < 1 or per < 1 or splits * per < rows:
        raise ValueError(f"{fn}: plan {plan} does not cover {rows} rows")
    check_array(fn, "db", db, dt, (n,))
    check_array(fn, "partial", partial, np.float64, (None,))
    if partial.size < splits * n:
        raise ValueError(f"{fn}: partial holds {partial.size} values; expected >= {splits * n}")
    check_status_block(fn, status)
    launch_kernel(
        kernels,
        ck.bias_grad_partial(dt),
        ck.blocks_for(splits * n),
        (delta, np.int64(rows), np.int32(n), np.int64(per), np.int64(splits), partial),
    )
    launch_kernel(
        kernels,
        ck.bias_grad_finish(dt),
        min(-(-n // 32), 65536),  # a tile of 32 columns per block
        (partial, np.int64(splits), np.int32(n), db, status),
        32 * min(ck.BIAS_GROUPS, ck.reduction_threads(splits) // 32),
    )


# --- optimizers.cu --------------------------------------------------------------------------------


def _table(fn: str, table: Any, n: int) -> None:
    check_array(fn, "table", table, np.int64, (n, ck.TABLE_COLS))


def update_table(
    kernels: KernelGetter,
    optimizer: Any,
    dtype: Any,
    table: Any,
    n: int,
    chunks: int,
    hp: Any,
    status: Any,
) -> None:
    """Every tensor of ``table`` updated by ``optimizer``'s rule in one launch.

    ``table``: int64 ``(n, TABLE_COLS)`` of device pointers and sizes, and ``chunks`` chunks, from
    :func:`.catalogue.build_table`; parameters, gradients and states are ``dtype``, as is ``hp``
    (:func:`.catalogue.hyperparameters`). Skipped on the device when ``status[STATUS_BAD]`` is set.
    """
    _optimizer_table(kernels, False, optimizer, dtype, table, n, chunks, hp, status)


def check_update_table(
    kernels: KernelGetter,
    optimizer: Any,
    dtype: Any,
    table: Any,
    n: int,
    chunks: int,
    hp: Any,
    status: Any,
) -> None:
    """Set ``status[STATUS_BAD]`` if ``optimizer``'s update of ``table`` would give any NaN or
    infinite parameter or state value; nothing is written. Arguments as :func:`update_table`,
    which, launched next on the same ``status``, then skips itself."""
    _optimizer_table(kernels, True, optimizer, dtype, table, n, chunks, hp, status)


def _optimizer_table(kernels: KernelGetter, check: bool, *args: Any) -> None:
    """Check the arguments (``optimizer, dtype, table, n, chunks, hp, status``, as
    :func:`update_table`'s) of ``optimizer``'s table kernel and launch it: the update, or with
    ``check`` the kernel that flags a non-finite new value."""
    optimizer, dtype, table, n, chunks, hp, status = args
    fn = "check_update_table" if check else "update_table"
    _table(fn, table, n)
    check_hp_block(fn, hp, dtype)
    check_status_block(fn, status)
    name = ck.update_table(optimizer.op, dtype, optimizer.variant, check=check)
    launch_kernel(
        kernels,
        name,
        ck.blocks_for(chunks * ck.THREADS),
        (table, np.int32(n), np.int64(chunks), np.int64(ck.CHUNK), hp, status),
    )


# --- guard.cu -------------------------------------------------------------------------------------


def check_finite_table(
    kernels: KernelGetter, dtype: Any, table: Any, n: int, biggest: int, status: Any
) -> None:
    """Set ``status[STATUS_BAD]`` if a gradient of ``table`` (``(n, TABLE_COLS)``) is not finite.

    ``biggest``: the largest tensor's size (it sizes the grid).
    """
    _table("check_finite_table", table, n)
    check_status_block("check_finite_table", status)
    launch_kernel(
        kernels,
        ck.check_finite_table(dtype),
        ck.blocks_for(biggest),
        (table, np.int32(n), status),
    )


def zero_if_bad_table(
    kernels: KernelGetter, dtype: Any, table: Any, n: int, biggest: int, status: Any
) -> None:
    """Zero the ``TAB_PARAM`` buffers of ``table`` (``(n, TABLE_COLS)``) if ``status[STATUS_BAD]``
    is set: the deltas the folded plain-SGD GEMM reads, so a skipped step adds exactly 0 to ``W``.
    """
    _table("zero_if_bad_table", table, n)
    check_status_block("zero_if_bad_table", status)
    launch_kernel(
        kernels,
        ck.zero_if_bad_table(dtype),
        ck.blocks_for(biggest),
        (table, np.int32(n), status),
    )


def finish_step(kernels: KernelGetter, status: Any) -> None:
    """The last node of a train step: count it as skipped when ``status[STATUS_BAD]`` is set."""
    check_status_block("finish_step", status)
    launch_kernel(kernels, ck.finish_step(), 1, (status,))


# --- metrics.cu -----------------------------------------------------------------------------------


def argmax_accuracy(
    kernels: KernelGetter, a: Any, Y: Any, labels: Any, pred: Any, correct: Any, status: Any
) -> None:
    """``pred`` ``(rows,)`` int64 = argmax of each row of ``a`` ``(rows, n)`` (NumPy's rule);
    with targets, ``correct`` ``(1,)`` uint64 += rows predicted right.

    Targets: ``Y`` ``(rows, n)`` dense (compared by argmax), or ``labels`` ``(rows,)`` int64, or
    neither (``correct`` untouched).
    """
    fn = "argmax_accuracy"
    dt = float_array(fn, "a", a, 2)
    rows, n = a.shape
    if Y is not None and labels is not None:
        raise ValueError(f"{fn}: give at most one of Y (dense targets) and labels")
    target = ck.TARGET_NONE
    if Y is not None:
        check_array(fn, "Y", Y, dt, (rows, n))
        target = ck.TARGET_DENSE
    elif labels is not None:
        check_array(fn, "labels", labels, np.int64, (rows,))
        target = ck.TARGET_LABELS
    check_array(fn, "pred", pred, np.int64, (rows,))
    check_array(fn, "correct", correct, np.uint64, (1,))
    check_status_block(fn, status)
    launch_kernel(
        kernels,
        ck.argmax_accuracy(dt, target),
        ck.row_blocks(rows),
        (
            a,
            _NULL if Y is None else Y,
            _NULL if labels is None else labels,
            np.int64(rows),
            np.int32(n),
            pred,
            correct,
            status,
        ),
    )


def threshold_accuracy(kernels: KernelGetter, a: Any, y: Any, correct: Any) -> None:
    """``correct`` ``(1,)`` uint64 += number of elements with ``(a > 0.5) == (y > 0.5)``.

    ``a`` and ``y``: same shape and dtype (sigmoid outputs and 0/1 targets).
    """
    fn = "threshold_accuracy"
    dt = float_array(fn, "a", a, a.ndim if hasattr(a, "ndim") else 1)
    check_array(fn, "y", y, dt, tuple(a.shape))
    check_array(fn, "correct", correct, np.uint64, (1,))
    launch_kernel(
        kernels,
        ck.threshold_accuracy(dt),
        ck.blocks_for(a.size),
        (a, y, np.int64(a.size), correct),
    )


# --- cuBLAS ---------------------------------------------------------------------------------------


def gemm(
    blas: Any,
    trans_a: bool,
    trans_b: bool,
    A: Any,
    B: Any,
    C: Any,
    alpha: str,
    beta: str,
    hp: Any,
    tf32: bool = False,
) -> Any:
    """Row-major ``C = alpha * op(A) @ op(B) + beta * C`` on ``blas`` (a :class:`.cublas.Cublas`).

    ``alpha``/``beta`` name hyper-parameter slots (``"ONE"``, ``"ZERO"``, ``"NEG_LR"``, ...) of
    the device block ``hp``, read by cuBLAS in device pointer mode, so a captured graph reads
    their current values. Shapes: ``op(A)`` ``(M, K)``, ``op(B)`` ``(K, N)``, ``C`` ``(M, N)``.
    Runs on ``blas``'s stream. Returns ``C``.
    """
    for slot in (alpha, beta):
        if slot not in ck.HP:
            raise ValueError(f"gemm: {slot!r} is not a hyper-parameter slot; expected one of "
                             f"{list(ck.HP)}")  # fmt: skip
    dt = float_array("gemm", "C", C, 2)
    check_hp_block("gemm", hp, dt)
    base, item = int(hp.data.ptr), dt.itemsize
    return blas.gemm(
        trans_a, trans_b, A, B, C, base + ck.HP[alpha] * item, base + ck.HP[beta] * item, tf32
    )
