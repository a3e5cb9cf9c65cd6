"""The Numba backend's train step: every layer's gradients in one kernel call and the update
checked without a read pass where it can be proved finite, or plain SGD folded into the
gradient GEMM (a mixin of :class:`~.backend.NumbaBackend`)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import numpy as np

from ... import activations as act
from ..base import Backend
from . import gemm as numba_blas
from . import kernels as K
from . import layers
from .checked import limits
from .tuner import ThreadTuner
from .update import gradient_bound
from .workspace import NumbaWorkspace

_HIDDEN = {name: act.ACTIVATION_IDS[name] for name in act.HIDDEN_ACTIVATIONS}
_STEP_OPS = (
    "forward_layer",
    "output_delta",
    "hidden_delta",
    "parameter_gradients",
    "sgd_update",
    "adam_update",
)

#: Largest batch whose plain-SGD step is folded into the gradient GEMM. BLAS adds the GEMM's
#: partial sums over the batch into W block by block, so the update is rounded once per block
#: of rows: at batch 4096 that made the step's change 3e-4 off in float32 (narrow layers), over
#: the 2e-4 tolerance. Up to 512 rows it stays below 1e-4, and above it ``dW`` is small beside
#: the GEMMs anyway.
FOLD_MAX_BATCH = 512


def folds(optimizer: Any, lr: float, batch: int) -> bool:
    """Whether a step at rate ``lr`` is plain SGD folded into the gradient GEMMs: no momentum,
    ``lr wd <= 1`` (the weights' factor ``1 - lr wd`` not negative) and at most
    :data:`FOLD_MAX_BATCH` rows."""
    return (
        optimizer.kind == "sgd"
        and not optimizer.momentum
        and lr * optimizer.weight_decay <= 1.0
        and batch <= FOLD_MAX_BATCH
    )


class Net(NamedTuple):
    """A network's arrays as the one-call kernels take them, for one batch size: kept per set
    of arrays (it holds them, so an ``id`` cannot be reused meanwhile)."""

    ws: NumbaWorkspace
    Ws: tuple[Any, ...]
    bs: tuple[Any, ...]
    acts: tuple[Any, ...]
    ds: tuple[Any, ...]
    dWs: tuple[Any, ...]
    dbs: tuple[Any, ...]
    params: list[Any]
    grads: list[Any]
    #: hidden activation, output activation and loss, as the kernels number them
    ids: tuple[int, int, int]
    #: the dtype's bound on a parameter's change (see :func:`.checked.limits`) and its largest
    change: float
    largest: float
    #: the thread count of each step, where it is tuned (:mod:`.tuner`)
    tuner: ThreadTuner | None


class _TunedScope:
    """One step of ``net`` in the host's thread scope, at the count its tuner picks (where the
    count is tuned), and the step's time handed to the tuner when it returns without an error
    (a class, not a generator: a generator-based context costs a few microseconds a step)."""

    __slots__ = ("rows", "scope", "start", "tuner")

    def __init__(self, host: Any, net: Net, rows: int) -> None:
        self.tuner = net.tuner if host.adaptive_threads else None
        self.scope = host._threads(None if self.tuner is None else self.tuner.threads())
        self.rows, self.start = rows, 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()
        self.scope.__enter__()

    def __exit__(self, kind: object, *rest: object) -> None:
        self.scope.__exit__(kind, *rest)
        if kind is None and self.tuner is not None:
            self.tuner.record(time.perf_counter() - self.start, self.rows)


class NumbaStep:
    """``train_step`` of the Numba backend; the host provides the ops, the workspace, the
    thread setting and the checked update."""

    blas_in_kernels: bool
    split_min_rows: int
    threads: int | None
    adaptive_threads: bool
    _own_ops: Any
    _fits: Any
    _parts: Any
    _threads: Any
    _stage: Any
    _backprop: Any
    _split_targets: Any
    workspace_for: Any
    check_loss: Any
    apply_update: Any
    checked_update_bounded: Any

    def _net(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> Net | None:
        """This network's :class:`Net` for ``x``'s batch size, or None where the one-call
        step does not apply (an op overridden, an activation or loss without a kernel, arrays
        that are not C-contiguous of one float dtype, no hidden layer, a batch split over
        threads). Kept for the last few networks and batch sizes, so a step's Python is a
        lookup."""
        B = x.shape[0]
        key = (*map(id, weights), *map(id, biases), B, activation, output, loss)
        nets = self.__dict__.setdefault("_nets", {})
        net = nets.get(key, False)
        if net is False:
            net = self._make_net(weights, biases, x, activation, output, loss)
            nets[key] = net
            while len(nets) > 4:
                nets.pop(next(iter(nets)))
        if net is not None and B >= 2 * self.split_min_rows and self._parts(B) != 1:
            return None
        return net

    def _make_net(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> Net | None:
        if len(weights) < 2 or not self._own_step(weights, biases, activation, loss):
            return None
        ws = self.workspace_for(weights, x)
        assert isinstance(ws, NumbaWorkspace)
        lim = limits(weights[0].dtype)
        return Net(
            ws,
            tuple(weights),
            tuple(biases),
            tuple(ws.a[1:]),
            tuple(ws.d[1:]),
            tuple(ws.dW),
            tuple(ws.db),
            [*weights, *biases],
            [*ws.dW, *ws.db],
            (_HIDDEN[activation], act.ACTIVATION_IDS[output], K.LOSS_IDS[loss]),
            float(lim[1]),
            float(np.finfo(weights[0].dtype).max),
            ThreadTuner(self.threads or 1) if self._tunable() else None,
        )

    def _own_step(self, weights: list[Any], biases: list[Any], activation: str, loss: str) -> bool:
        """Whether this class's kernels take the step: a GEMM provider, no op overridden, an
        activation and a loss with kernels, C-contiguous arrays of one float dtype."""
        return (
            self.blas_in_kernels
            and self._own_ops(_STEP_OPS)
            and activation in _HIDDEN
            and loss in K.LOSS_IDS
            and self._fits(weights[0].dtype, *weights, *biases)
        )

    def _tunable(self) -> bool:
        """Whether a step's thread count may be tuned: more than one thread, and a GEMM
        provider whose results do not depend on the count (the elementwise passes' do not)."""
        provider = numba_blas.PROVIDER
        return bool(self.threads and self.threads > 1 and provider and provider.same_at_any_threads)

    def _net_inputs(self, net: Net, x: Any, y: Any) -> tuple[NumbaWorkspace, Any, Any, Any]:
        """``(ws, a0, labels, Y)``: ``x`` staged into the workspace and the targets as
        :meth:`_split_targets` gives them."""
        ws = net.ws
        labels, Y = self._split_targets(y, net.Ws[-1].shape[0], ws.dtype, ws)
        return ws, self._stage(x, ws.a[0]), labels, Y

    def _net_gradients(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> tuple[Any, list[Any], list[Any]] | None:
        """``(C, dWs, dbs)`` in one kernel call (:func:`.layers.backprop`), timed for the
        network's thread tuner as a step is; None where the one-call step does not apply. The
        gradient arrays belong to the workspace."""
        net = self._net(weights, biases, x, activation, output, loss)
        if net is None:
            return None
        with _TunedScope(self, net, x.shape[0]):
            ws, value, _ = self._net_backprop(net, x, y)
        return value, ws.dW, ws.db

    def _net_backprop(self, net: Net, x: Any, y: Any) -> tuple[NumbaWorkspace, Any, Any]:
        """``(ws, C, G)``: ``x`` staged and every gradient into the workspace in one kernel call
        (:func:`.layers.backprop`), with ``G >= max |g|``."""
        ws, a0, labels, Y = self._net_inputs(net, x, y)
        value, gmax = layers.backprop(
            a0, labels, Y, net.Ws, net.bs, net.acts, ws.z_out, net.ds, net.dWs, net.dbs,
            *net.ids, ws.cm, float(ws.batch),
        )  # fmt: skip
        return ws, value, gmax

    def train_step(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        state: dict[str, Any],
    ) -> tuple[Any, list[Any], list[Any], dict[str, Any]]:
        """Forward, loss, backward and update; ``(C, weights, biases, state)``, updated in place.

        Plain SGD (no momentum) up to :data:`FOLD_MAX_BATCH` rows folds the update into the
        gradient GEMMs (:func:`.layers.backprop_fold`). Otherwise every gradient is computed
        with the bound on ``max |g|`` the passes give (:func:`.layers.backprop`), and the
        checked update of :mod:`.update` needs no read pass before it writes when its proof
        applies: two kernel calls a step. A batch split over threads takes the base class's
        step. Either way, if the loss, a gradient or a new parameter or state value is not
        finite, :class:`~gpubp.errors.NonFiniteLossError` is raised with nothing changed.
        """
        net = self._net(weights, biases, x, activation, output, loss)
        args = (weights, biases, x, y, activation, output, loss, optimizer, state)
        if net is None:  # (a batch split over threads computes dW and updates as here)
            one_layer = len(weights) == 1 and self._own_step(weights, biases, activation, loss)
            if not (one_layer and self._parts(x.shape[0]) == 1):
                return Backend.train_step(self, *args)  # type: ignore[arg-type]
            with self._threads():  # layer by layer, with the bound for the checked update
                ws, _, value, bounds = self._backprop(*args[:7], False, True)
                self.check_loss(value)
                self.checked_update_bounded(
                    value, [*weights, *biases], [*ws.dW, *ws.db], optimizer, state,
                    gradient_bound(bounds, ws.db), scratch=ws.pscratch,
                )  # fmt: skip
            return value, weights, biases, state
        if folds(optimizer, float(optimizer.lr), x.shape[0]):
            return self._folded_step(net, *args)
        with _TunedScope(self, net, x.shape[0]):
            ws, value, gmax = self._net_backprop(net, x, y)
            self.check_loss(value)
            self.checked_update_bounded(
                value, net.params, net.grads, optimizer, state, float(gmax), scratch=ws.pscratch
            )
        return value, weights, biases, state

    def _folded_step(
        self,
        net: Net,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        state: dict[str, Any],
    ) -> tuple[Any, list[Any], list[Any], dict[str, Any]]:
        """Plain SGD folded into the gradient GEMMs, ``W = -lr delta.T @ a_prev + (1 - lr wd)
        W``, so ``dW`` is never written nor read back: one kernel call
        (:func:`.layers.backprop_fold`), which writes only where that provably cannot produce
        NaN or infinity. Otherwise ``dW`` is computed from the deltas it left and
        :meth:`apply_update` checks and applies it."""
        sgd = np.array(fold_scalars(net, float(optimizer.lr), float(optimizer.weight_decay)))
        with _TunedScope(self, net, x.shape[0]):
            ws, a0, labels, Y = self._net_inputs(net, x, y)
            value, done = layers.backprop_fold(
                a0, labels, Y, net.Ws, net.bs, net.acts, ws.z_out, net.ds, net.dbs,
                *net.ids, ws.cm, float(ws.batch), sgd,
            )  # fmt: skip
            if not done:  # compute dW the plain way; apply_update raises if anything is off
                L = len(weights)
                for i in range(L):
                    delta = ws.z_out if i == L - 1 else ws.d[i + 1]
                    layers.weight_gradient(delta, a0 if i == 0 else ws.a[i], ws.dW[i], 1.0, 0.0)
                self.apply_update(value, net.params, net.grads, optimizer, state)
                return value, weights, biases, state
        state["step"] = int(state["step"]) + 1
        return value, weights, biases, state


def fold_scalars(net: Net, lr: float, wd: float) -> tuple[float, float, float, float]:
    """The float64 ``(lr, weight_decay, lr_ok, change)`` of :func:`.layers.backprop_fold`."""
    return (lr, wd, 1.0 if lr <= net.largest else 0.0, net.change)
