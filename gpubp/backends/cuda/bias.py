"""The bias gradients of every layer of a train step in two launches, from a layer table.

For layers ``l = 0 .. L-1`` with deltas ``delta_l`` ``(rows_l, n_l)``::

    db_l[c] = sum over r of delta_l[r, c]          (n_l,)

as :func:`.launch.bias_grad` computes one layer (``kernels/bias_grad.cu``), bit for bit: each
layer keeps its own plan (:func:`.catalogue.bias_grad_plan`) and the kernels call the same
per-item and per-tile bodies. ``bias_grad_partial_layers`` writes every layer's partial column
sums into one float64 scratch (layer ``l``'s after those of the layers before it), then
``bias_grad_finish_layers`` adds them in ``fixed_sum``'s order, a block per tile of 32 columns
of some layer. Two launches for the step instead of ``2 L``. Every layer's delta must have the
same dtype (a train step's do); the table holds device pointers, so it is built once, with the
step's buffers, and replays in a captured graph unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import catalogue as ck
from .launch import KernelGetter, check_array, check_status_block, float_array, launch_kernel


class BiasLayers:
    """The layer table of the bias gradients ``dbs[l] = deltas[l].sum(axis=0)``, on the device.

    Parameters
    ----------
    cp : module
        The cupy module (the table is uploaded once, here).
    deltas : list of device arrays
        ``(rows_l, n_l)`` C-contiguous, all of one float dtype.
    dbs : list of device arrays
        ``(n_l,)`` of that dtype.

    Attributes
    ----------
    items : int
        The partial sums of all layers: the float64 scratch :func:`bias_grad_layers` needs.
    tiles, threads : int
        The finish kernel's tiles of 32 columns, in all, and its block size.
    """

    def __init__(self, cp: Any, deltas: list[Any], dbs: list[Any]) -> None:
        fn = "BiasLayers"
        if not deltas or len(deltas) != len(dbs):
            raise ValueError(f"{fn}: give one bias gradient per delta (got {len(deltas)} deltas, "
                             f"{len(dbs)} gradients)")  # fmt: skip
        self.dtype = float_array(fn, "deltas[0]", deltas[0], 2)
        rows = []
        for k, (d, db) in enumerate(zip(deltas, dbs)):
            check_array(fn, f"deltas[{k}]", d, self.dtype, (None, None))
            check_array(fn, f"dbs[{k}]", db, self.dtype, (int(d.shape[1]),))
            rows.append((int(d.data.ptr), int(db.data.ptr), int(d.shape[0]), int(d.shape[1])))
        table, self.items, self.tiles, self.threads = ck.bias_table(rows)
        self.layers = len(rows)
        self.dev = cp.asarray(table)


def bias_grad_layers(kernels: KernelGetter, layers: BiasLayers, partial: Any, status: Any) -> None:
    """Every layer's ``db = sum over rows of delta`` of ``layers`` in two launches.

    ``partial``: float64 scratch of at least ``layers.items`` values. A column sum that is not
    finite sets ``status[STATUS_BAD]``; the other columns are still written.
    """
    fn = "bias_grad_layers"
    check_array(fn, "partial", partial, np.float64, (None,))
    if partial.size < layers.items:
        raise ValueError(f"{fn}: partial holds {partial.size} values; expected >= {layers.items}")
    check_status_block(fn, status)
    launch_kernel(
        kernels,
        ck.bias_grad_partial_layers(layers.dtype),
        ck.blocks_for(layers.items),
        (layers.dev, np.int32(layers.layers), np.int64(layers.items), partial),
    )
    launch_kernel(
        kernels,
        ck.bias_grad_finish_layers(layers.dtype),
        min(layers.tiles, 65536),
        (layers.dev, np.int32(layers.layers), np.int64(layers.tiles), partial, status),
        layers.threads,
    )
