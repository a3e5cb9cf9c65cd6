"""The Numba backend's optimizer step: one write pass in the usual case, nothing changed on a
rejected step.

A step may write only if every new parameter and state value will be finite. The write pass
(:mod:`.optim_kernels`) is preceded by no read pass when the proof of
:func:`.optim_kernels.provably_finite` applies, which needs:

- ``G >= max |g|`` over every gradient. From :meth:`NumbaUpdate.train_step`'s passes it comes
  for free: ``|dW^l| <= B max|delta^l| max|a^{l-1}|`` from the maxima the elementwise passes
  take while they write (``max |a|`` is inf if ``a`` holds NaN or infinity), and ``max |db|``
  from a read of the bias gradients (a few hundred numbers; ``db`` finite means every delta
  in its column is, so ``max|delta|`` is exact). Gradients from elsewhere (a data-parallel
  all-reduce, a batch split over threads) are read once for it (:func:`.optim_kernels.absmax`).
- The optimizer state's maxima, which the previous write pass returned. They are kept in the
  state dict itself, under :data:`~gpubp.backends.update.MAXIMA`, beside the arrays they
  describe: a state that is new, loaded or written by any other path has none (those paths
  drop the key), and then the exact check pass (every new value computed, nothing written)
  runs first. So a loaded state with a negative ``exp_avg_sq`` is checked, and rejected.
"""

from __future__ import annotations

import math
from typing import Any

from ..update import MAXIMA, UpdateOps
from . import optim_kernels as O

_UPDATE_OPS = ("sgd_update", "adam_update")


class NumbaUpdate:
    """The optimizer ops and the checked step of the Numba backend (a mixin of it)."""

    _fits: Any
    _own_ops: Any
    _threads: Any
    _over_ranges: Any
    _map_ranges: Any
    _rejected: Any

    def sgd_update(
        self,
        param: Any,
        grad: Any,
        buf: Any,
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
        *,
        scratch: Any = None,
        out: tuple[Any, Any] | None = None,
    ) -> tuple[Any, Any]:
        """SGD step in place on ``param`` and ``buf``, one pass in the parameters' dtype; see
        :meth:`.update.UpdateOps.sgd_update` (``out=`` goes there)."""
        mbuf = param if buf is None else buf
        if out is not None or not self._fits(param.dtype, param, grad, mbuf):
            return UpdateOps.sgd_update(
                self,  # type: ignore[arg-type]
                param,
                grad,
                buf,
                lr,
                momentum,
                nesterov,
                weight_decay,
                scratch=scratch,
                out=out,
            )
        flat = [a.reshape(-1) for a in (param, grad, mbuf)]
        scalars = O.sgd_scalars(param.dtype, lr, momentum, nesterov, weight_decay)
        O.sgd_apply(*flat, 0, param.size, *scalars)  # type: ignore[call-arg]
        return param, buf

    def adam_update(
        self,
        param: Any,
        grad: Any,
        m: Any,
        v: Any,
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        *,
        scratch: Any = None,
        out: tuple[Any, Any, Any] | None = None,
    ) -> tuple[Any, Any, Any]:
        """Adam / AdamW step in place on ``param``, ``m``, ``v``, one pass in the parameters'
        dtype; see :meth:`.update.UpdateOps.adam_update` (``out=`` goes there)."""
        args = (step, lr, beta1, beta2, eps, weight_decay, decoupled)
        if out is not None or not self._fits(param.dtype, param, grad, m, v):
            return UpdateOps.adam_update(
                self,  # type: ignore[arg-type]
                param,
                grad,
                m,
                v,
                *args,
                scratch=scratch,
                out=out,
            )
        flat = [a.reshape(-1) for a in (param, grad, m, v)]
        O.adam_apply(*flat, 0, param.size, *O.adam_scalars(param.dtype, *args))  # type: ignore[call-arg]
        return param, m, v

    def checked_update(
        self,
        value: Any,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Every parameter updated only if every new parameter and state value is finite: the
        proof (``max |g|`` read once here) or the exact check pass, then the write pass.
        Otherwise as :meth:`.update.UpdateOps.checked_update`."""
        return self.checked_update_bounded(
            value, params, grads, optimizer, state, None, scratch=scratch
        )

    def checked_update_bounded(
        self,
        value: Any,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        gmax: float | None,
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """:meth:`checked_update` given ``gmax >= max |g|`` over every gradient (None: read it).

        Each pass is split over the threads above ``update_split_min`` elements per thread.
        The write pass returns the new state's maxima, kept in ``state`` for the next step.
        """
        slots = [state[s] for s in optimizer.slots]
        dt = params[0].dtype
        if (
            optimizer.op not in _UPDATE_OPS
            or not self._own_ops(_UPDATE_OPS)
            or not self._fits(dt, *params, *grads, *(a for col in slots for a in col))
        ):
            return UpdateOps.checked_update(
                self,  # type: ignore[arg-type]
                value,
                params,
                grads,
                optimizer,
                state,
                scratch=scratch,
            )
        step = int(state["step"]) + 1
        kind = "sgd" if optimizer.op == "sgd_update" else "adam"
        check, apply = (O.sgd_check, O.sgd_apply) if kind == "sgd" else (O.adam_check, O.adam_apply)
        scalars = O.scalars(kind, dt, optimizer.op_arguments(step))
        cols = [[p.reshape(-1) for p in params], [g.reshape(-1) for g in grads]]
        if kind == "sgd":  # the kernels take a momentum buffer; without one, p stands in
            cols.append([a.reshape(-1) for a in slots[0]] if slots else cols[0])
        else:
            cols += [[a.reshape(-1) for a in col] for col in slots]
        tensors = list(zip(*cols))
        maxima = state.pop(MAXIMA, None) if slots else ()
        with self._threads():
            if maxima is None or not self._proved(kind, cols, scalars, dt, maxima, gmax):
                for i in self._over_ranges(check, tensors, scalars):
                    raise self._rejected(value, params, grads, optimizer, i)
            results = [r for _, r in self._map_ranges(apply, tensors, scalars)]
        if slots:
            state[MAXIMA] = O.merge_maxima(kind, results)
        state["step"] = step
        return params, state

    def _proved(
        self,
        kind: str,
        cols: list[list[Any]],
        scalars: tuple[Any, ...],
        dt: Any,
        maxima: tuple[float, ...],
        gmax: float | None,
    ) -> bool:
        """Whether :func:`.optim_kernels.provably_finite` proves this step, given the state's
        ``maxima`` and ``gmax`` (``max |g|`` is read where it is None; ``max |p|`` where the
        proof needs it)."""

        def biggest(col: list[Any]) -> float:
            return max(float(r) for _, r in self._map_ranges(O.absmax, [(a,) for a in col], ()))

        G = biggest(cols[1]) if gmax is None else gmax
        P = biggest(cols[0]) if O.needs_parameter_bound(kind, scalars) else 0.0
        return O.provably_finite(kind, scalars, dt, G, P, maxima)


def gradient_bound(bounds: list[float], dbs: list[Any]) -> float:
    """``G >= max |g|`` over every gradient of a step: the passes' bounds on each ``|dW|`` and
    the exact ``max |db|`` (inf if a ``db`` holds NaN or infinity)."""
    values = [float(O.absmax(db, 0, db.size)) for db in dbs] + [float(b) for b in bounds]
    # a NaN bound (0 * inf: a zero delta beside an infinite activation) bounds nothing
    return math.inf if any(math.isnan(v) for v in values) else max(values)
