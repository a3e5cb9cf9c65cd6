"""The Numba backend's optimizer step: one write pass in the usual case, nothing changed on a
rejected step.

A step may write only if every new parameter and state value will be finite. The whole step
is one kernel call (:mod:`.checked`): the write pass (:mod:`.optim_kernels`) is preceded by no
read pass when the proof applies, which needs:

- ``G >= max |g|`` over every gradient. From :meth:`.step.NumbaStep.train_step`'s passes it comes
  for free: ``|dW^l| <= B max|delta^l| max|a^{l-1}|`` from the maxima the elementwise passes
  take while they write (``max |a|`` is inf if ``a`` holds NaN or infinity), and ``max |db|``
  from a read of the bias gradients (a few hundred numbers; ``db`` finite means every delta
  in its column is, so ``max|delta|`` is exact). Gradients from elsewhere (a data-parallel
  all-reduce, a batch split over threads) are read once for it, inside the same kernel call.
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

from ...optim import adam_scalars
from ..update import MAXIMA, UpdateOps
from . import checked as C
from . import many as M
from . import optim_kernels as O

_UPDATE_OPS = ("sgd_update", "adam_update")


class _Plan(NamedTuple):
    """The checked step of one set of tensors: the rule ("sgd" or "adam"), the flat tensors
    ``(ps, gs, *slots)``, the kernel of :mod:`.checked`, its chunk plan (none on one thread)
    and the dtype's limits."""

    kind: str
    cols: tuple[tuple[Any, ...], ...]
    run: Any
    extra: tuple[Any, ...]
    limits: Any


class NumbaUpdate:
    """The optimizer ops and the checked step of the Numba backend (a mixin of it)."""

    #: Fewest elements (all tensors together) for an update pass to run on every thread.
    update_par_min: ClassVar[int] = 1 << 15
    #: Elements per chunk of a parallel update pass (16 KiB of float32). Each thread takes one
    #: share of every tensor (:func:`.checked.chunk_plan`), cut into these chunks: measured
    #: right after the step's GEMMs (``benchmarks/step_parts.py``'s update row, 2 threads),
    #: 64 Ki, 16 Ki and 4 Ki chunks took the same time and 1 Ki chunks 30 us more on the default
    #: model's Adam, where each chunk's own set-up shows. (Before the shares, when the chunks
    #: went out in tensor order, the smaller ones balanced the threads: 191 us alone at 16 Ki,
    #: 180 us at 4 Ki.)
    update_chunk: ClassVar[int] = 1 << 12
    #: Whether a step may be decided by the proof (False: the exact check pass always).
    prove_updates: bool = True
    #: Checked steps written so far, by what decided them ("proved" or "checked").
    update_counts: dict[str, int]
    kernel_threads: Any

    _fits: Any
    _own_ops: Any
    _threads: Any
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

    def sgd_update_many(
        self,
        params: list[Any],
        grads: list[Any],
        bufs: list[Any],
        lr: float,
        momentum: float,
        nesterov: bool,
        weight_decays: list[float],
        *,
        scratch: list[Any] | None = None,
    ) -> None:
        """:meth:`sgd_update` on every tensor in one kernel call (:mod:`.many`), in parallel
        over chunks from ``update_par_min`` elements; see
        :meth:`.update.UpdateOps.sgd_update_many`."""
        mbufs = [p if b is None else b for p, b in zip(params, bufs)]
        run = self._many_run("sgd_update", (params, grads, mbufs))
        if run is None:
            UpdateOps.sgd_update_many(
                self,  # type: ignore[arg-type]
                params, grads, bufs, lr, momentum, nesterov, weight_decays, scratch=scratch,
            )  # fmt: skip
            return
        dt = params[0].dtype
        rows = {wd: O.sgd_scalars(dt, lr, momentum, nesterov, wd) for wd in set(weight_decays)}
        scal = np.array([[r[0], r[1], r[3]] for r in (rows[wd] for wd in weight_decays)], dtype=dt)
        kernel, cols, extra = run
        with self._threads():
            kernel(*cols, scal, bool(nesterov), *extra)

    def adam_update_many(
        self,
        params: list[Any],
        grads: list[Any],
        ms: list[Any],
        vs: list[Any],
        step: int,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decays: list[float],
        decoupled: bool,
        *,
        scratch: list[Any] | None = None,
    ) -> None:
        """:meth:`adam_update` on every tensor in one kernel call (:mod:`.many`), in parallel
        over chunks from ``update_par_min`` elements; see
        :meth:`.update.UpdateOps.adam_update_many`."""
        run = self._many_run("adam_update", (params, grads, ms, vs))
        if run is None:
            UpdateOps.adam_update_many(
                self,  # type: ignore[arg-type]
                params, grads, ms, vs, step, lr, beta1, beta2, eps, weight_decays, decoupled,
                scratch=scratch,
            )  # fmt: skip
            return
        dt = params[0].dtype
        args = (step, lr, beta1, beta2, eps)
        rows = {wd: O.adam_scalars(dt, *args, wd, decoupled) for wd in set(weight_decays)}
        scal = np.array([rows[wd] for wd in weight_decays], dtype=dt)
        kernel, cols, extra = run
        with self._threads():
            kernel(*cols, scal, *extra)

    def _many_run(
        self, op: str, cols: tuple[list[Any], ...]
    ) -> tuple[Any, tuple[tuple[Any, ...], ...], tuple[Any, ...]] | None:
        """``(kernel, flat columns, extra)`` of :mod:`.many` for the tensors of ``cols``, kept
        for the last few sets of arrays (the views hold them, so an ``id`` cannot be reused
        meanwhile); None where ``op`` is overridden or the tensors are not C-contiguous of one
        float dtype."""
        threads = self.kernel_threads()
        key = (op, threads, *(id(a) for col in cols for a in col))
        cache: dict[Any, Any] = self.__dict__.setdefault("_many_runs", {})
        run = cache.get(key)
        if run is not None:
            return run
        arrays = [a for col in cols for a in col]
        if not self._own_ops((op,)) or not self._fits(arrays[0].dtype, *arrays):
            return None
        flat = tuple(tuple(a.reshape(-1) for a in col) for col in cols)
        sgd = op == "sgd_update"
        kernel, extra = self._kernel_for(
            [int(p.size) for p in cols[0]],
            threads,
            (M.sgd_many, M.sgd_many_par) if sgd else (M.adam_many, M.adam_many_par),
        )
        run = cache[key] = (kernel, flat, extra)
        while len(cache) > 4:
            cache.pop(next(iter(cache)))
        return run

    def _kernel_for(
        self, sizes: list[int], threads: int, kernels: tuple[Any, Any]
    ) -> tuple[Any, tuple[Any, ...]]:
        """``(kernel, extra)`` for tensors of ``sizes``: the serial one of ``kernels`` (and no
        extra argument) on one thread or below ``update_par_min`` elements, else the parallel
        one and its chunk plan."""
        if threads < 2 or sum(sizes) < self.update_par_min:
            return kernels[0], ()
        return kernels[1], (C.chunk_plan(sizes, self.update_chunk, threads),)

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

        One kernel call (:mod:`.checked`): the proof, the exact check pass where the proof does
        not apply, and the write pass. From ``update_par_min`` elements each pass runs in
        parallel over chunks of ``update_chunk`` elements. The write pass returns the new
        state's maxima, kept in ``state`` for the next step.
        """
        slots = [state[s] for s in optimizer.slots]
        plan = self._update_plan(optimizer, params, grads, slots)
        if plan is None:
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
        wide = np.array(step_scalars(plan.kind, optimizer, step), dtype=np.float64)
        known, _ = take_maxima(state, bool(slots), self.prove_updates)
        G = -1.0 if gmax is None else float(gmax)
        with self._threads():
            status = plan.run(*plan.cols, wide, G, known, plan.limits, *plan.extra)
        if status >= 0:
            raise self._rejected(value, params, grads, optimizer, int(status))
        self.update_counts["proved" if status == C.PROVED else "checked"] += 1
        if slots:
            keep_maxima(state, plan.kind, known)
        state["step"] = step
        return params, state

    def _update_plan(
        self, optimizer: Any, params: list[Any], grads: list[Any], slots: list[list[Any]]
    ) -> _Plan | None:
        """The kernel, flat views ``(ps, gs, *slots)`` (SGD without momentum passes ``ps`` as
        its buffer) and chunk plan of this step's tensors, kept for the last few sets of arrays
        (the views hold their arrays, so an ``id`` cannot be reused meanwhile); None where the
        update is not this backend's own or the tensors are not C-contiguous of one float
        dtype."""
        threads = self.kernel_threads()
        key = (
            optimizer.op,
            threads,
            *map(id, params),
            *map(id, grads),
            *(i for col in slots for i in map(id, col)),
        )
        cache = self.__dict__.setdefault("_update_plans", {})
        plan = cache.get(key)
        if plan is not None:
            return plan
        dt = params[0].dtype
        if (
            optimizer.op not in _UPDATE_OPS
            or not self._own_ops(_UPDATE_OPS)
            or not self._fits(dt, *params, *grads, *(a for col in slots for a in col))
        ):
            return None
        kind = "sgd" if optimizer.op == "sgd_update" else "adam"
        flat = [tuple(a.reshape(-1) for a in col) for col in (params, grads, *slots)]
        if kind == "sgd" and not slots:
            flat.append(flat[0])
        run, extra = self._kernel_for(
            [int(p.size) for p in params],
            threads,
            (C.sgd_step, C.sgd_step_par) if kind == "sgd" else (C.adam_step, C.adam_step_par),
        )
        plan = cache[key] = _Plan(kind, tuple(flat), run, extra, C.limits(dt))
        while len(cache) > 4:  # (two thread counts of two sets of tensors)
            cache.pop(next(iter(cache)))
        return plan


def step_scalars(kind: str, optimizer: Any, step: int) -> tuple[float, ...]:
    """The float64 scalars of the checked kernels for step ``step`` at ``optimizer.lr``:
    SGD's ``op_arguments`` (4), Adam's :func:`gpubp.optim.adam_scalars` (8)."""
    args = optimizer.op_arguments(step)
    return tuple(args) if kind == "sgd" else tuple(adam_scalars(*args))


def take_maxima(state: dict[str, Any], slots: bool, prove: bool) -> tuple[np.ndarray, Any]:
    """``(known, maxima)``: the state's kept maxima taken out of ``state`` (``()`` for a rule
    without state, None where none are kept) into ``known``, the checked kernels' ``(1,
    *maxima)``; ``known[0]`` is 0 where there are none or ``prove`` is False (the exact check
    then decides)."""
    known = np.zeros(4)
    maxima = state.pop(MAXIMA, None) if slots else ()
    if maxima is not None:
        known[0] = 1.0 if prove else 0.0
        known[1 : 1 + len(maxima)] = maxima
    return known, maxima


def keep_maxima(state: dict[str, Any], kind: str, known: np.ndarray) -> None:
    """The maxima a write pass left in ``known`` kept in ``state`` for the next step's proof."""
    state[MAXIMA] = (float(known[1]),) if kind == "sgd" else tuple(map(float, known[1:]))


def gradient_bound(bounds: list[float], dbs: list[Any]) -> float:
    """``G >= max |g|`` over every gradient of a step: the passes' bounds on each ``|dW|`` and
    the exact ``max |db|`` (inf if a ``db`` holds NaN or infinity)."""
    values = [float(O.absmax(db, 0, db.size)) for db in dbs] + [float(b) for b in bounds]
    # a NaN bound (0 * inf: a zero delta beside an infinite activation) bounds nothing
    return math.inf if any(math.isnan(v) for v in values) else max(values)
