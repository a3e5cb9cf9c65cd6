"""The train steps a backend keeps: one per batch shape, parameter buffers and optimizer variant.

A step holds its buffers and, once captured, its CUDA graph, so the cache is small (least
recently used dropped first) and keyed by everything the recorded step bakes in: layer sizes,
batch, dtype, the functions, the target form, the optimizer variant and the device pointers of
the parameters and optimizer state, and of the batch gather's buffers a step reads in place.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import launch
from .context import DeviceContext
from .graph import CaptureLog, StepBuffers, StepSpec, TrainStep, folds

#: Train steps kept captured (least recently used dropped first).
MAX_GRAPHS = 4

#: ``allocate(sizes, batch, dtype)``: a step's buffers (or an out-of-memory error).
Allocate = Callable[[tuple[int, ...], int, Any], StepBuffers]


class StepCache:
    """The train steps of one backend, made on first use of a key and replayed after.

    Parameters
    ----------
    ctx : DeviceContext
        The backend's device context.
    kernels : callable
        The backend's kernel getter.
    allocate : callable
        Makes a step's buffers (:data:`Allocate`).
    graphs : str
        ``"on"``: capture the steps as CUDA graphs (eager, with a warning, where that fails),
        ``"require"``: a failed capture is an error, ``"off"``: eager steps.
    fold_sgd : bool
        Fold plain SGD's weight update into the gradient GEMM.
    """

    def __init__(
        self,
        ctx: DeviceContext,
        kernels: launch.KernelGetter,
        allocate: Allocate,
        *,
        graphs: str,
        fold_sgd: bool,
    ) -> None:
        self._ctx, self._kernels, self._allocate = ctx, kernels, allocate
        self.graphs, self.fold_sgd = graphs != "off", fold_sgd
        self._steps: OrderedDict[tuple[Any, ...], TrainStep] = OrderedDict()
        self._said_eager = False
        self.log = CaptureLog(graphs)

    def values(self) -> list[TrainStep]:
        """The steps kept, least recently used first."""
        return list(self._steps.values())

    def clear(self) -> None:
        """Drop every step (and so its buffers and graph)."""
        self._steps.clear()

    def get(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        slots: list[list[Any]] | None,
        inputs: tuple[Any, Any] | None = None,
    ) -> TrainStep:
        """The step for these arrays and settings (``optimizer=None``: gradients only); with
        ``inputs`` (``(x, y)``, a gather's buffers) a step that reads them in place."""
        sizes = (weights[0].shape[1], *(W.shape[0] for W in weights))
        dtype = weights[0].dtype
        labels = y.ndim == 1 and y.dtype.kind in "iu" and sizes[-1] > 1
        spec = StepSpec(activation, output, loss, labels, self.fold_sgd and folds(optimizer))
        structure: tuple[Any, ...] = ()
        if optimizer is not None:
            structure = (optimizer.op, *optimizer.variant, spec.fold)
        key = (
            sizes,
            int(x.shape[0]),
            dtype.str,
            spec,
            structure,
            tuple(p.data.ptr for p in [*weights, *biases]),
            tuple(t.data.ptr for s in (slots or []) for t in s),
            None if inputs is None else (inputs[0].data.ptr, inputs[1].data.ptr),
        )
        step = self._steps.get(key)
        if step is not None:
            self._steps.move_to_end(key)
            return step
        buf = self._allocate(sizes, int(x.shape[0]), dtype)
        step = TrainStep(
            self._ctx, self._kernels, buf, weights, biases, spec, optimizer, slots,
            graphs=self.graphs, on_eager=self._say_eager, log=self.log, inputs=inputs,
        )  # fmt: skip
        self._steps[key] = step
        while len(self._steps) > MAX_GRAPHS:
            self._steps.popitem(last=False)
        return step

    def _say_eager(self, why: str) -> None:
        if not self._said_eager:
            self._said_eager = True
            warnings.warn(
                f"gpubp cupy backend: the train step cannot be captured as a CUDA graph ({why}); "
                "running its kernels eagerly instead (same results, more launch overhead)",
                RuntimeWarning,
                stacklevel=4,
            )
