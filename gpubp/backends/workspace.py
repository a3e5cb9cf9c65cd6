"""The buffers of one train step: :class:`Workspace`, for one (layer sizes, batch size, dtype)
on any array module."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class Workspace:
    """Every buffer one train step needs, for one (layer sizes, batch size, dtype).

    ``a[l]``: ``(B, n_l)`` activations for ``l = 0..L-1`` (``a[0]`` holds the staged input);
    ``z_out``: ``(B, n_L)``, the output pre-activation, then ``delta^L`` in place;
    ``d[l]``: ``(B, n_l)`` deltas of the hidden layers ``l = 1..L-1`` (``d[0]`` is None: the
    input needs no delta); ``dW[l]``, ``db[l]``: gradients;
    ``y``: ``(B, n_L)`` targets; scratch buffers for activations and the optimizer.
    """

    def __init__(self, xp: Any, sizes: tuple[int, ...], batch: int, dtype: Any) -> None:
        L = len(sizes) - 1
        widest = max(sizes)
        self.batch = batch
        self.a = [xp.empty((batch, n), dtype=dtype) for n in sizes[:-1]]
        self.z_out = xp.empty((batch, sizes[-1]), dtype=dtype)
        self.d: list[Any] = [None] + [xp.empty((batch, n), dtype=dtype) for n in sizes[1:-1]]
        self.dW = [xp.empty((sizes[i + 1], sizes[i]), dtype=dtype) for i in range(L)]
        self.db = [xp.empty((sizes[i + 1],), dtype=dtype) for i in range(L)]
        self.y = xp.empty((batch, sizes[-1]), dtype=dtype)
        self.scratch = xp.empty(batch * widest, dtype=dtype)
        self.rowbuf = xp.empty((batch, 1), dtype=dtype)
        self.rows = xp.arange(batch, dtype=np.int64)
        self.flat_idx = xp.empty(batch, dtype=np.int64)
        biggest = max(sizes[i + 1] * sizes[i] for i in range(L))
        self.pscratch = xp.empty(2 * biggest, dtype=dtype)

    def scratch_like(self, shape: tuple[int, ...]) -> Any:
        """A view of the activation scratch buffer with ``shape``."""
        return self.scratch[: math.prod(shape)].reshape(shape)


__all__ = ["Workspace"]
