"""The Numba backend's optimizer step: one write pass in the usual case, nothing changed on a
rejected step.

A step may write only if every new parameter and state value will be finite. The write pass
(:mod:`.optim_kernels`) is preceded by no read pass when the proof of
:func:`.optim_kernels.provably_finite` applies, which needs:

- ``G >= max |g|`` over every gradient. From :meth:`.step.NumbaStep.train_step`'s passes it comes
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
from typing import Any, ClassVar, NamedTuple

import numpy as np

from ..update import MAXIMA, UpdateOps
from . import optim_kernels as O

_UPDATE_OPS = ("sgd_update", "adam_update")


class _Plan(NamedTuple):
    """One checked step: the rule, its scalars in the dtype, the flat tensors ``(ps, gs,
    *slots)``, the state's maxima (None: unknown) and the bound on ``max |g|`` (None: read)."""

    kind: str
    scalars: tuple[Any, ...]
    cols: tuple[tuple[Any, ...], ...]
    maxima: tuple[float, ...] | None
    gmax: float | None


class NumbaUpdate:
    """The optimizer ops and the checked step of the Numba backend (a mixin of it)."""

    #: Fewest elements (all tensors together) for an update pass to run on every thread.
    update_par_min: ClassVar[int] = 1 << 15
    #: Elements per chunk of a parallel update pass (64 KiB of float32: a few fit in L1 + L2).
    update_chunk: ClassVar[int] = 1 << 14
    kernel_threads: Any

    _fits: Any
    _own_ops: Any
    _threads: Any
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

        From ``update_par_min`` elements each pass runs in parallel over chunks of
        ``update_chunk`` elements (:meth:`_one_call`). The write pass returns the new state's
        maxima, kept in ``state`` for the next step.
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
        plan = _Plan(
            kind,
            O.scalars(kind, dt, optimizer.op_arguments(step)),
            self._columns(kind, params, grads, slots),
            state.pop(MAXIMA, None) if slots else (),
            gmax,
        )
        with self._threads():
            new = self._one_call(value, params, grads, optimizer, plan)
        if slots:
            state[MAXIMA] = new
        state["step"] = step
        return params, state

    def _columns(
        self, kind: str, params: list[Any], grads: list[Any], slots: list[list[Any]]
    ) -> tuple[tuple[Any, ...], ...]:
        """``(ps, gs, *slots)``: flat views of every tensor, as tuples (kept for the last few
        sets of arrays: the views hold their arrays, so an ``id`` cannot be reused meanwhile).
        SGD without momentum passes ``ps`` as its buffer."""
        key = (kind, *map(id, params), *map(id, grads), *(id(a) for col in slots for a in col))
        cache = self.__dict__.setdefault("_columns_cache", {})
        cols = cache.get(key)
        if cols is None:
            flat = [tuple(a.reshape(-1) for a in col) for col in (params, grads, *slots)]
            if kind == "sgd" and not slots:
                flat.append(flat[0])
            cols = cache[key] = tuple(flat)
            while len(cache) > 2:
                cache.pop(next(iter(cache)))
        return cols

    def _one_call(
        self, value: Any, params: list[Any], grads: list[Any], optimizer: Any, plan: _Plan
    ) -> tuple[float, ...]:
        """The check (unless proved) and the write pass over every tensor, one kernel call each
        (:func:`.optim_kernels.sgd_all`, :func:`~.optim_kernels.adam_all`); the new maxima."""
        wide = np.array([float(x) for x in plan.scalars])
        chunks = self._chunks(plan.cols[0])
        if chunks is None:
            run: Any = O.sgd_all if plan.kind == "sgd" else O.adam_all
            extra: tuple[Any, ...] = ()
        else:
            run, extra = (O.sgd_all_par if plan.kind == "sgd" else O.adam_all_par), (chunks,)
        if not self._proved_plan(params, plan):
            bad = run(*plan.cols, wide, False, *extra)
            first = int(bad if plan.kind == "sgd" else bad[0])
            if first >= 0:
                raise self._rejected(value, params, grads, optimizer, first)
        got = run(*plan.cols, wide, True, *extra)
        return (float(got),) if plan.kind == "sgd" else tuple(float(x) for x in got)

    def _chunks(self, ps: tuple[Any, ...]) -> Any:
        """The chunk plan of a parallel pass over tensors of ``ps``'s sizes (kept per sizes),
        or None where one thread does it: one thread set, or fewer than
        :attr:`update_par_min` elements."""
        sizes = [int(p.shape[0]) for p in ps]
        if self.kernel_threads() < 2 or sum(sizes) < self.update_par_min:
            return None
        cache = self.__dict__.setdefault("_chunk_plans", {})
        key = tuple(sizes)
        if key not in cache:
            cache[key] = O.chunk_plan(sizes, self.update_chunk)
        return cache[key]

    def _proved_plan(self, params: list[Any], plan: _Plan) -> bool:
        if plan.maxima is None:
            return False
        cols = [list(c) for c in plan.cols]
        return self._proved(plan.kind, cols, plan.scalars, params[0].dtype, plan.maxima, plan.gmax)

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
