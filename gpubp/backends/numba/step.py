"""The Numba backend's train step: every layer's gradients in one kernel call and the update
checked without a read pass where it can be proved finite, or plain SGD folded into the
gradient GEMM (a mixin of :class:`~.backend.NumbaBackend`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ... import activations as act
from ..base import Backend
from . import kernels as K
from . import layers
from .optim_kernels import sgd_apply, sgd_check, sgd_scalars
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


class NumbaStep:
    """``train_step`` of the Numba backend; the host provides the ops, the workspace, the
    thread setting and the checked update."""

    blas_in_kernels: bool
    _own_ops: Any
    _fits: Any
    _parts: Any
    _threads: Any
    _staged: Any
    _backprop: Any
    check_loss: Any
    apply_update: Any
    checked_update_bounded: Any

    def _fused_backprop(
        self,
        weights: list[Any],
        biases: list[Any],
        x: Any,
        y: Any,
        activation: str,
        output: str,
        loss: str,
    ) -> tuple[NumbaWorkspace, float, float]:
        """``(ws, C, G)``: :meth:`_backprop` with ``dW`` and the bound ``G >= max |g|``, all
        layers in one kernel call (:func:`.layers.backprop`), from Python only the staging."""
        ws, a0, labels, Y = self._staged(weights, x, y)
        L = len(weights)
        if L < 2:  # no hidden layer: nothing to put in the tuples of hidden buffers
            _, _, value, bounds = self._backprop(
                weights, biases, x, y, activation, output, loss, False, True
            )
            return ws, value, gradient_bound(bounds, ws.db)
        value, gmax = layers.backprop(
            a0,
            labels,
            Y,
            tuple(weights),
            tuple(biases),
            tuple(ws.a[1:]),
            ws.z_out,
            tuple(ws.d[1:]),
            tuple(ws.dW),
            tuple(ws.db),
            _HIDDEN[activation],
            act.ACTIVATION_IDS[output],
            K.LOSS_IDS[loss],
            ws.cm,
            float(ws.batch),
        )
        return ws, float(value), float(gmax)

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
        gradient GEMM (:meth:`_folded_step`). Otherwise every gradient is computed with the
        bound on ``max |g|`` the passes give, and the checked update of
        :mod:`.update` needs no read pass before it writes when its proof applies. A batch
        split over threads takes the base class's step. Either way, if the loss, a gradient
        or a new parameter or state value is not finite,
        :class:`~gpubp.errors.NonFiniteLossError` is raised with nothing changed.
        """
        own = (
            self.blas_in_kernels
            and self._own_ops(_STEP_OPS)
            and activation in _HIDDEN
            and loss in K.LOSS_IDS
            and self._fits(weights[0].dtype, *weights, *biases)
            and self._parts(x.shape[0]) == 1
        )
        if not own:  # (a batch split over threads computes dW and updates as here)
            return Backend.train_step(
                self,  # type: ignore[arg-type]
                weights,
                biases,
                x,
                y,
                activation,
                output,
                loss,
                optimizer,
                state,
            )
        args = (weights, biases, x, y, activation, output, loss)
        if (
            optimizer.kind == "sgd"
            and not optimizer.momentum
            and optimizer.lr * optimizer.weight_decay <= 1.0
            and x.shape[0] <= FOLD_MAX_BATCH
        ):
            return self._folded_step(*args, optimizer, state)
        with self._threads():
            ws, value, gmax = self._fused_backprop(*args)
            self.check_loss(value)
            grads = [*ws.dW, *ws.db]
            self.checked_update_bounded(
                value, [*weights, *biases], grads, optimizer, state, gmax, scratch=ws.pscratch
            )
        return value, weights, biases, state

    def _folded_step(
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
        """Plain SGD folded into the gradient GEMM,
        ``W = -lr delta.T @ a_prev + (1 - lr wd) W``, so ``dW`` is never written nor read back.

        Done only when it provably cannot produce NaN or infinity: the loss and every new bias
        are finite (so every ``db`` and delta is), ``lr`` is a finite number of the dtype, and
        ``lr B max|delta| max|a|`` is far below the dtype's largest number for every layer (so
        ``|W - lr dW|`` cannot round past it: the change is far below half a unit in the last
        place of the largest finite number). Otherwise ``dW`` is computed and
        :meth:`apply_update` checks and applies it.
        """
        with self._threads():
            ws, a0, value, bounds = self._backprop(
                weights, biases, x, y, activation, output, loss, True
            )
            L = len(weights)
            lr, wd = float(optimizer.lr), float(optimizer.weight_decay)
            dt = weights[0].dtype
            limit = float(np.finfo(dt).max) * 2.0**-60
            safe = (
                np.isfinite(value)
                and lr <= float(np.finfo(dt).max)  # -lr, the GEMM's alpha, is a finite number
                and all((bd <= limit and lr * bd <= limit) for bd in bounds)
            )
            # the biases' new values are checked (nothing written) before any weight changes;
            # a non-finite db makes its new bias non-finite, so this checks db too
            scalars = sgd_scalars(dt, lr, 0.0, False, wd)
            flat_b = [(b.reshape(-1), db, b.reshape(-1)) for b, db in zip(biases, ws.db)]
            if safe:
                safe = not any(sgd_check(*t, 0, t[0].size, *scalars) for t in flat_b)
            if not safe:  # compute dW the plain way; apply_update raises if anything is off
                for i in range(L):
                    delta = ws.z_out if i == L - 1 else ws.d[i + 1]
                    layers.weight_gradient(delta, a0 if i == 0 else ws.a[i], ws.dW[i], 1.0, 0.0)
                self.apply_update(value, [*weights, *biases], [*ws.dW, *ws.db], optimizer, state)
                return value, weights, biases, state
            shrink = 1.0 - lr * wd
            for i in range(L):
                delta = ws.z_out if i == L - 1 else ws.d[i + 1]
                layers.weight_gradient(delta, a0 if i == 0 else ws.a[i], weights[i], -lr, shrink)
                sgd_apply(*flat_b[i], 0, biases[i].size, *scalars)
            state["step"] = int(state["step"]) + 1
        return value, weights, biases, state
