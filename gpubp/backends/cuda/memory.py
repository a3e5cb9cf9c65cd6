"""Device memory of one train step: the estimate, the batch that fits, the out-of-memory error.

Pure Python (no CuPy, no GPU), so the estimate is tested on any machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import DeviceOutOfMemoryError


def workspace_bytes(sizes: Sequence[int], batch: int, dtype: Any) -> tuple[int, int]:
    """``(fixed, per_sample)`` device bytes of one train step's buffers (an upper estimate).

    ``per_sample`` grows with the batch: activations, deltas, targets, scratch, the row losses,
    labels and the bias-gradient partial sums; ``fixed`` does not: ``dW``, ``db``, the
    optimizer scratch. The parameters and optimizer state are not included (they exist already).
    """
    item = np.dtype(dtype).itemsize
    L = len(sizes) - 1
    widest = max(sizes)
    per_sample = item * (sum(sizes[:-1]) + 2 * sizes[-1] + sum(sizes[1:-1]) + widest + 2)
    per_sample += 8 * 3  # row indices, flat indices, int64 labels
    # every layer's bias partial sums, one after another (>= 32 rows each, one more split)
    per_sample += 8 * math.ceil(sum(sizes[1:]) / 32) + 8
    fixed = item * sum(sizes[i + 1] * (sizes[i] + 1) for i in range(L)) + 8 * sum(sizes[1:])
    fixed += 2 * item * max(sizes[i + 1] * sizes[i] for i in range(L))
    fixed += 64 * 1024  # tables, status word, hyper-parameters, alignment
    return fixed, per_sample


def fitting_batch(free_bytes: int, sizes: Sequence[int], dtype: Any) -> int:
    """The largest batch whose step buffers fit in ``free_bytes`` (90 % of it), or 0."""
    fixed, per_sample = workspace_bytes(sizes, 1, dtype)
    return max(0, int((0.9 * free_bytes - fixed) // per_sample))


def out_of_memory_error(
    sizes: Sequence[int], batch: int, dtype: Any, free_bytes: int
) -> DeviceOutOfMemoryError:
    """The error for step buffers that did not fit: the bytes needed and free, a batch that fits."""
    fixed, per_sample = workspace_bytes(sizes, batch, dtype)
    need = fixed + per_sample * batch
    fits = fitting_batch(free_bytes, sizes, dtype)
    advice = (
        f"batch_size={fits} would fit"
        if fits > 0
        else "no batch size fits; the parameters alone fill the GPU, so make the network smaller"
    )
    return DeviceOutOfMemoryError(
        f"out of GPU memory: a train step of layer sizes {list(sizes)} at batch size "
        f"{batch} ({np.dtype(dtype).name}) needs about {need:,} bytes of buffers, and "
        f"{free_bytes:,} bytes are free; {advice}"
    )
