"""The Numba backend's per-batch-shape buffers."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..workspace import Workspace


class NumbaWorkspace(Workspace):
    """The base workspace plus an int64 label buffer and empty "not wanted" markers."""

    def __init__(self, xp: Any, sizes: tuple[int, ...], batch: int, dtype: Any) -> None:
        super().__init__(xp, sizes, batch, dtype)
        self.labels = np.empty(batch, dtype=np.int64)
        self.no_db = np.empty(0, dtype=dtype)
        self.no_y = np.empty((0, 0), dtype=dtype)
        self.cm = np.empty(2 * max(sizes), dtype=dtype)  # per-column maxima (absmax: 2 n)
        self.sizes = sizes
        self.dtype = np.dtype(dtype)
        #: parts -> per extra part (1 .. parts-1) its own ``(dW, db)`` (part 0 uses dW, db)
        self.partials: dict[int, list[tuple[list[Any], list[Any]]]] = {}

    def partial_buffers(self, parts: int) -> list[tuple[list[Any], list[Any]]]:
        """``(dW, db)`` gradient buffers for parts ``1 .. parts - 1`` of a split batch."""
        bufs = self.partials.get(parts)
        if bufs is None:
            s, L = self.sizes, len(self.sizes) - 1
            bufs = [
                (
                    [np.empty((s[i + 1], s[i]), dtype=self.dtype) for i in range(L)],
                    [np.empty(s[i + 1], dtype=self.dtype) for i in range(L)],
                )
                for _ in range(parts - 1)
            ]
            self.partials[parts] = bufs
        return bufs
