"""The Numba backend's run of many training steps in one kernel call (:mod:`.multistep`): a
mixin of :class:`~.backend.NumbaBackend`, used by the training loops for the full batches of
an epoch, so that a small network's step is not paced by Python between its kernels."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import checked as C
from . import multistep as MS
from .step import Net, fold_scalars, folds
from .update import keep_maxima, step_scalars, take_maxima

_NO_PLAN = np.zeros((0, 3), dtype=np.int64)
_NO_LABELS = np.zeros(0, dtype=np.int64)


def _batch_targets(ws: Any, labels: Any) -> tuple[Any, Any]:
    """``(lab, Yb)``: the workspace's buffers a step's targets are gathered into, the other one
    empty (the kernels tell labels from dense targets by which one has the batch's rows)."""
    return (ws.labels, ws.no_y) if labels.shape[0] else (_NO_LABELS, ws.y)


class NumbaSteps:
    """``train_steps`` of the Numba backend; the host provides the one-call network
    (:meth:`.step.NumbaStep._net`), its thread scope and the checked update's plan."""

    prove_updates: bool
    update_counts: dict[str, int]
    adaptive_threads: bool
    _net: Any
    _threads: Any
    _update_plan: Any
    _fits: Any

    def train_steps(
        self,
        weights: list[Any],
        biases: list[Any],
        X: Any,
        y: Any,
        order: Any,
        start: int,
        count: int,
        batch: int,
        activation: str,
        output: str,
        loss: str,
        optimizer: Any,
        state: dict[str, Any],
        lrs: list[float],
    ) -> list[float] | None:
        """Up to ``count`` steps on batches of ``batch`` rows ``order[start + s batch : start +
        (s + 1) batch]`` of ``(X, y)``, step ``s`` at learning rate ``lrs[s]``, in as few
        kernel calls as the thread tuner allows; their losses, in order.

        Fewer where a step must be taken the ordinary way (nothing of that step is written),
        and None where this backend can take none of these steps (a network without the
        one-call step, arrays not C-contiguous of the parameters' dtype, targets not int64
        labels or rows of that dtype, a batch split over threads). ``optimizer.lr`` is left
        at the last step's rate, and an interruption (Ctrl-C) counts the steps written. The
        numbers are those of the same steps taken one by one.
        """
        count = min(count, len(lrs))
        x0 = X[:batch] if isinstance(X, np.ndarray) and X.ndim == 2 else None
        net = None if x0 is None else self._net(weights, biases, x0, activation, output, loss)
        labels, Y = self._all_targets(y, net)
        if net is None or labels is None or not self._fits(net.ws.dtype, X):
            return None
        order = np.ascontiguousarray(order, dtype=np.int64)
        losses: list[float] = []
        while len(losses) < count:
            rates = lrs[len(losses) : count]
            if net.tuner is not None and self.adaptive_threads:
                rates = rates[: net.tuner.run_length()]
            # a run is all folded steps or none, each decided as a step alone decides it
            fold = folds(optimizer, rates[0], batch)
            rates = rates[
                : next((i for i, r in enumerate(rates) if folds(optimizer, r, batch) != fold), None)
            ]
            first = start + len(losses) * batch
            run = self._fold_run if fold else self._update_run
            with self._threads(self._count(net)):  # the update's plan is made for this count
                done = run(net, X, labels, Y, order, first, rates, optimizer, state)
            losses.extend(done)
            if len(done) < len(rates):
                break
        return losses

    def _all_targets(self, y: Any, net: Net | None) -> tuple[Any, Any]:
        """``(labels, Y)`` of the whole training set as the kernels take them, or
        ``(None, None)`` where ``y`` is neither int64 labels nor rows of the net's dtype."""
        if net is None or not isinstance(y, np.ndarray) or not y.flags.c_contiguous:
            return None, None
        n_out = net.Ws[-1].shape[0]
        if y.ndim == 1 and y.dtype == np.int64 and n_out > 1:
            return y, net.ws.no_y
        if y.ndim == 2 and y.shape[1] == n_out and y.dtype == net.ws.dtype:
            return _NO_LABELS, y
        return None, None

    def _count(self, net: Net) -> int | None:
        """The thread count the tuner picks for the next steps (None: the backend's own)."""
        return net.tuner.threads() if net.tuner is not None and self.adaptive_threads else None

    def _timed(self, net: Net, call: Any, progress: Any) -> None:
        """``call()`` (in the scope of :meth:`_count`), its time handed to the tuner per step
        written (``progress[0]``)."""
        tuner = net.tuner if self.adaptive_threads else None
        used = self._count(net)
        t0 = time.perf_counter()
        call()
        done = int(progress[0])
        if tuner is not None and done:
            per_step = (time.perf_counter() - t0) / done
            for _ in range(done):  # (an alarm may start a probe: later steps ran before it)
                if tuner.threads() != used:
                    break
                tuner.record(per_step, net.ws.batch)

    @staticmethod
    def _count_steps(
        optimizer: Any, state: dict[str, Any], rates: list[float], step: int, done: int
    ) -> None:
        """The optimizer's rate and the state's step count after ``done`` steps written (also
        where the call was interrupted: what the kernel wrote is counted, no more)."""
        if done:
            optimizer.lr = rates[done - 1]
            state["step"] = step + done

    def _fold_run(
        self, net: Net, X: Any, labels: Any, Y: Any, order: Any, first: int,
        rates: list[float], optimizer: Any, state: dict[str, Any],
    ) -> list[float]:  # fmt: skip
        """Plain SGD folded into the GEMMs (:func:`.multistep.fold_steps`)."""
        ws, k, wd = net.ws, len(rates), float(optimizer.weight_decay)
        sgds = np.array([fold_scalars(net, lr, wd) for lr in rates])
        out, progress, step = np.empty(k), np.zeros(1, dtype=np.int64), int(state["step"])
        args = (
            X, labels, Y, order, first, k, ws.a[0], *_batch_targets(ws, labels),
            net.Ws, net.bs, net.acts, ws.z_out, net.ds, net.dbs, *net.ids, ws.cm, sgds, out,
            progress,
        )  # fmt: skip
        try:
            self._timed(net, lambda: MS.fold_steps(*args), progress)
        finally:
            self._count_steps(optimizer, state, rates, step, int(progress[0]))
        return out[: int(progress[0])].tolist()

    def _update_run(
        self, net: Net, X: Any, labels: Any, Y: Any, order: Any, first: int,
        rates: list[float], optimizer: Any, state: dict[str, Any],
    ) -> list[float]:  # fmt: skip
        """Backpropagation and the checked update (:func:`.multistep.adam_steps` or
        :func:`.multistep.sgd_steps`: a run compiles its own rule's kernel only)."""
        slots = [state[s] for s in optimizer.slots]
        plan = self._update_plan(optimizer, net.params, net.grads, slots)
        if plan is None:
            return []
        ws, k, step = net.ws, len(rates), int(state["step"])
        adam = plan.kind == "adam"
        wides = np.zeros((k, 8 if adam else 4))
        before = optimizer.lr
        for s, lr in enumerate(rates):
            optimizer.lr = lr
            wides[s] = step_scalars(plan.kind, optimizer, step + s + 1)
        optimizer.lr = before
        # the maxima are handed over whatever prove_updates says: the kernel clears known[0]
        # before each step where it says no, and they are kept again if nothing is written
        known, maxima = take_maxima(state, bool(slots), True)
        out, statuses = np.empty(k), np.zeros(k, dtype=np.int64)
        progress = np.zeros(1, dtype=np.int64)
        args = (
            X, labels, Y, order, first, k, ws.a[0], *_batch_targets(ws, labels),
            net.Ws, net.bs, net.acts, ws.z_out, net.ds, net.dWs, net.dbs, *net.ids, ws.cm,
            plan.cols, wides, known, self.prove_updates, plan.limits,
            plan.extra[0] if plan.extra else _NO_PLAN, out, statuses, progress,
        )  # fmt: skip
        kernel = MS.adam_steps if adam else MS.sgd_steps
        try:
            self._timed(net, lambda: kernel(*args), progress)
        finally:  # what the kernel wrote, also where the call was interrupted
            done = int(progress[0])
            if slots and (known[0] != 0.0 or maxima is not None):
                keep_maxima(state, plan.kind, known)
            for st in statuses[:done]:
                self.update_counts["proved" if st == C.PROVED else "checked"] += 1
            self._count_steps(optimizer, state, rates, step, done)
        return out[:done].tolist()


__all__ = ["NumbaSteps"]
