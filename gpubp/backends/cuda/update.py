"""The optimizer update outside the train step's graph: every tensor in one launch from a table.

Three entry points of :class:`CudaUpdateOps`, a mixin of the CuPy backend:

- :meth:`~CudaUpdateOps.update_parameters`: the update kernel, unchecked;
- :meth:`~CudaUpdateOps.checked_update`: the check kernel over the whole table, one read of its
  status word, then the update kernel;
- :meth:`~CudaUpdateOps.reduced_update`: the data-parallel step's update after the all-reduce,
  with no read of its own: the loss checked as a gradient, the check kernel, the update kernel
  (which skips itself on a raised flag), and the verdict written into the reduced buffer's
  tail, which comes back with the loss and the stop flag in the step's one read. Its
  hyper-parameters are the graph step's (:class:`.scalars.StepScalars`): Adam's step scalars
  and a schedule's rate computed on the device, so a steady step uploads nothing.

The pointer tables are kept by their rows (:class:`UpdateTables`: pointers and sizes decide a
table's content), so updating the same tensors again uploads nothing; a hyper-parameter block
is uploaded through the pinned ring only when its values change.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from . import catalogue as ck
from . import launch
from .context import DeviceContext, Entry, table_entries
from .scalars import StepScalars


class UpdateTables:
    """What the updates outside the graph keep on the device: pointer tables by their rows
    (least recently used dropped first), a hyper-parameter block per device and dtype (with
    the values last uploaded), and a status word per device for :meth:`reduced_update`.

    Parameters
    ----------
    ctx : DeviceContext
        The backend's device context (cupy, the current device, its ring).
    keep : int
        Tables kept.
    """

    def __init__(self, ctx: DeviceContext, keep: int = 8) -> None:
        self._ctx, self._keep = ctx, keep
        self._tables: OrderedDict[tuple[Any, ...], tuple[Any, int]] = OrderedDict()
        self._hp: dict[tuple[int, str], tuple[Any, np.ndarray]] = {}
        self._scalars: dict[tuple[Any, ...], StepScalars] = {}
        self._status: dict[int, Any] = {}

    def table(self, entries: list[Entry]) -> tuple[Any, int]:
        """``(device table, chunks)`` of :func:`.catalogue.build_table` for ``entries``."""
        key = (self._ctx.device().id, *entries)
        got = self._tables.get(key)
        if got is None:
            table, chunks = ck.build_table(entries)
            got = self._tables[key] = (self._ctx.cp.asarray(table), chunks)
            while len(self._tables) > self._keep:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return got

    def hyperparameters(self, hp: np.ndarray) -> Any:
        """The current device's block for ``hp``'s dtype, holding ``hp`` (uploaded, in stream
        order, only when it differs from the last values uploaded there)."""
        dev = self._ctx.device()
        key = (dev.id, hp.dtype.str)
        block, last = self._hp.get(key, (None, None))
        if block is None:
            block = self._ctx.cp.empty(ck.HP_SLOTS, dtype=hp.dtype)
        if last is None or not np.array_equal(last, hp):
            dev.ring.upload(hp, block)
            self._hp[key] = (block, hp.copy())
        return block

    def scalars(self, dtype: Any, *, adam: bool, schedule: bool) -> StepScalars:
        """The current device's :class:`.scalars.StepScalars` of ``dtype`` for Adam's step
        scalars (``adam``) and a schedule's rate (``schedule``) computed on the device, each
        kind kept with what it last uploaded."""
        key = (self._ctx.device().id, np.dtype(dtype).str, adam, schedule)
        got = self._scalars.get(key)
        if got is None:
            got = self._scalars[key] = StepScalars(
                self._ctx.cp, dtype, adam=adam, schedule=schedule
            )
        return got

    def status(self) -> Any:
        """The current device's status word of the data-parallel update (zeroed by its user)."""
        dev = self._ctx.device().id
        if dev not in self._status:
            self._status[dev] = self._ctx.cp.zeros(ck.STATUS_SLOTS, dtype=np.int32)
        return self._status[dev]


class CudaUpdateOps:
    """The table updates of :class:`~gpubp.backends.cuda.backend.CupyBackend`; it provides
    the attributes declared here (and the base class's update as ``super()``)."""

    _cp: Any
    _ctx: DeviceContext
    _tables: UpdateTables
    _fits: Any
    kernel: Any
    check_loss: Any

    def _table_args(
        self, params: list[Any], grads: list[Any], optimizer: Any, state: dict[str, Any]
    ) -> tuple[tuple[Any, Any, Any, int, int], Any]:
        """``(optimizer, dtype, table, n, chunks)`` of the update kernels, and the block of
        the next step's hyper-parameters."""
        slots = [state[s] for s in optimizer.slots]
        dtype = params[0].dtype
        table, chunks = self._tables.table(table_entries(params, grads, slots))
        hp = self._tables.hyperparameters(
            ck.hyperparameters(optimizer, int(state["step"]) + 1, dtype)
        )
        return (optimizer, dtype, table, len(params), chunks), hp

    def _fit_update(self, params: list[Any], grads: list[Any], optimizer: Any, state: Any) -> bool:
        slots = [state[s] for s in optimizer.slots]
        return bool(self._fits(*params, *grads, *(x for s in slots for x in s)))

    def update_parameters(
        self,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> tuple[list[Any], dict[str, Any]]:
        """Every parameter updated by one kernel launch from a table of pointers and sizes."""
        if not self._fit_update(params, grads, optimizer, state):
            return super().update_parameters(  # type: ignore[misc]
                params, grads, optimizer, state, scratch=scratch
            )
        args, hp = self._table_args(params, grads, optimizer, state)
        launch.update_table(self.kernel, *args, hp, self._ctx.device().clear_status)
        state["step"] = int(state["step"]) + 1
        return params, state

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
        """:meth:`update_parameters` only if every new parameter and state value is finite,
        checked on the device: the check kernel over the whole table, one read of its status
        word, then the update kernel. Where the check fails the NumPy-path check runs instead,
        which raises :class:`~gpubp.errors.NonFiniteLossError` naming the tensor; nothing is
        changed. ``value`` is the loss, for the message."""
        if not self._fit_update(params, grads, optimizer, state):
            return super().checked_update(  # type: ignore[misc]
                value, params, grads, optimizer, state, scratch=scratch
            )
        args, hp = self._table_args(params, grads, optimizer, state)
        status = self._tables.status()
        status.fill(0)
        launch.check_update_table(self.kernel, *args, hp, status)
        if int(status[ck.STATUS_BAD].get()) != 0:  # the one read
            return super().checked_update(  # type: ignore[misc]
                value, params, grads, optimizer, state, scratch=scratch
            )
        launch.update_table(self.kernel, *args, hp, status)
        state["step"] = int(state["step"]) + 1
        return params, state

    def reduced_update(
        self,
        tail: Any,
        params: list[Any],
        grads: list[Any],
        optimizer: Any,
        state: dict[str, Any],
        *,
        scratch: Any = None,
    ) -> np.ndarray:
        """The data-parallel update, in one read: the loss ``tail[0]`` and every new value
        checked on the device, the update skipped there if any is not finite, the verdict
        written into ``tail[-1]`` and the tail read once. A rejected step then raises what
        :meth:`~gpubp.backends.base.Backend.apply_update` raises (the loss's check, or the
        NumPy-path check naming the tensor), with nothing changed. Returns the tail as read."""
        if not self._fit_update([tail, *params], grads, optimizer, state):
            return super().reduced_update(  # type: ignore[misc]
                tail, params, grads, optimizer, state, scratch=scratch
            )
        slots = [state[s] for s in optimizer.slots]
        dtype = params[0].dtype
        table, chunks = self._tables.table(table_entries(params, grads, slots))
        args = (optimizer, dtype, table, len(params), chunks)
        # as the graph step: Adam's scalars and a schedule's rate computed on the device
        adam = optimizer.op == "adam_update"
        follows = getattr(optimizer, "schedule", None) is not None
        scalars = self._tables.scalars(dtype, adam=adam, schedule=follows)
        scalars.set(self._ctx.device().ring.upload, optimizer, int(state["step"]) + 1)
        loss_row, _ = self._tables.table([(0, int(tail.data.ptr), 0, 0, 1)])  # as a gradient
        status = self._tables.status()
        status.fill(0)
        scalars.record(self.kernel)
        launch.check_finite_table(self.kernel, dtype, loss_row, 1, 1, status)
        launch.check_update_table(self.kernel, *args, scalars.hp, status)
        launch.update_table(self.kernel, *args, scalars.hp, status)  # skips itself if flagged
        scalars.counted(self.kernel, status)  # Adam's counter, unless flagged
        tail[-1:] = status[ck.STATUS_BAD : ck.STATUS_BAD + 1]  # the verdict, beside the loss
        host: np.ndarray = tail.get()  # the step's one read
        if host[-1] != 0:
            value = float(host[0])
            self.check_loss(value)  # a non-finite loss: apply_update's first error
            super().checked_update(  # type: ignore[misc]
                value, params, grads, optimizer, state, scratch=scratch
            )  # raises naming the tensor (nothing was written on the device)
            return host
        state["step"] = int(state["step"]) + 1
        return host
