"""The train step's one-thread kernels of scalars (``kernels/optimizers.cu``), wrapped as
:mod:`.launch` wraps the others (the same checks, no synchronisation): the learning rate of a
schedule and Adam's step scalars, computed in the recorded step from counters in device memory so
that a steady step uploads nothing, and the counter the update advances; :class:`StepScalars`,
the block and the device state it is computed from, shared by the graph step and the
data-parallel update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import catalogue as ck
from .launch import (
    KernelGetter,
    check_array,
    check_hp_block,
    check_status_block,
    float_array,
    launch_kernel,
)


def schedule_lr(kernels: KernelGetter, hp: Any, hp64: Any, sched: Any, count: Any) -> None:
    """``hp64``'s learning rate and the slots derived from it set to the rate of global step
    ``count[0]`` (int64 ``(1,)``, then advanced) of the schedule block ``sched`` (float64
    ``(SCHED_SLOTS,)``, :func:`.catalogue.schedule_block`; one of kind 0 keeps ``hp64``'s rate
    and the counter), then ``hp`` = ``hp64`` in ``hp``'s dtype."""
    check_hp_block("schedule_lr", hp, float_array("schedule_lr", "hp", hp, 1))
    check_hp_block("schedule_lr", hp64, np.float64)
    check_array("schedule_lr", "sched", sched, np.float64, (ck.SCHED_SLOTS,))
    check_array("schedule_lr", "count", count, np.int64, (1,))
    launch_kernel(kernels, ck.schedule_lr(hp.dtype), 1, (hp, hp64, sched, count), 32)


def adam_step_scalars(kernels: KernelGetter, hp: Any, hp64: Any, steps: Any) -> None:
    """``hp`` = the float64 block ``hp64`` in ``hp``'s dtype, with Adam's ``HP_ALPHA`` and
    ``HP_EPS_HAT`` of step ``steps[0] + 1`` (int64 ``(1,)``) as ``optim.adam_scalars``."""
    check_hp_block("adam_step_scalars", hp, float_array("adam_step_scalars", "hp", hp, 1))
    check_hp_block("adam_step_scalars", hp64, np.float64)
    check_array("adam_step_scalars", "steps", steps, np.int64, (1,))
    launch_kernel(kernels, ck.adam_step_scalars(hp.dtype), 1, (hp, hp64, steps), 32)


def count_step(kernels: KernelGetter, steps: Any, status: Any) -> None:
    """``steps[0] += 1`` (int64 ``(1,)``) unless ``status[STATUS_BAD]`` is set."""
    check_array("count_step", "steps", steps, np.int64, (1,))
    check_status_block("count_step", status)
    launch_kernel(kernels, ck.count_step(), 1, (steps, status), 32)


class StepScalars:
    """The hyper-parameter block ``hp`` a step's kernels and GEMMs read, and the device state
    it is computed from, so that a steady step uploads nothing.

    Per step (1 first), :meth:`set` uploads what changed (asynchronously, through the pinned
    ring), then the step's first kernels (:meth:`record`) write ``hp``, and after its update
    :meth:`counted` advances Adam's counter. Without ``adam`` and ``schedule`` the host's
    block, in ``hp``'s dtype, is all there is. With ``adam``: the block in float64 (``hp64``)
    without its step's scalars, and ``hp`` = ``hp64`` rounded, with the bias corrections of
    step ``steps[0] + 1`` (``adam_step_scalars``, the float64 maths of ``optim.adam_scalars``);
    ``steps`` is uploaded where it is not ``step - 1`` already (a loaded or taken-back optimizer
    step count). With ``schedule``: ``hp64`` too, and where the optimizer's rate is its
    schedule's (:func:`.catalogue.device_schedule`) ``hp64`` holds the schedule's peak rate,
    which ``schedule_lr`` replaces by the rate of the global step counter ``count`` (the float64
    maths of ``Schedule.at``), uploaded where it is not that step already (a resumed run,
    another step's count); otherwise the host's rate is kept.

    Parameters
    ----------
    cp : module
        The cupy module.
    dtype : dtype
        The parameters' dtype (``hp``'s).
    adam : bool
        Adam's step scalars computed on the device (the optimizer's op is ``adam_update``).
    schedule : bool
        The learning rate computed on the device where it is a schedule's formula.
    """

    def __init__(self, cp: Any, dtype: Any, *, adam: bool, schedule: bool) -> None:
        self.dtype = np.dtype(dtype)
        self.adam, self.schedule = adam, schedule
        self.wide = adam or schedule
        self.hp = cp.zeros(ck.HP_SLOTS, dtype=self.dtype)
        self.hp64 = cp.zeros(ck.HP_SLOTS, dtype=np.float64)
        self.steps = cp.zeros(1, dtype=np.int64)
        self.sched = cp.zeros(ck.SCHED_SLOTS, dtype=np.float64)
        self.count = cp.zeros(1, dtype=np.int64)
        # what the host last uploaded, or expects the device to hold
        self.hp_host: np.ndarray | None = None
        self.steps_host: int | None = None
        self.sched_host: tuple[Any, Any] | None = None  # (schedule, optimizer kind)
        self.count_host: int | None = None

    def set(self, upload: Callable[[np.ndarray, Any], None], optimizer: Any, step: int) -> None:
        """Before step ``step`` (1 first) of ``optimizer``: ``upload(host, device)`` what
        changed (a :class:`.context.HostRing`'s ``upload``)."""
        follows = ck.device_schedule(optimizer) if self.schedule else None
        lr = None if follows is None else float(getattr(follows[0], "lr"))  # noqa: B009
        hp = ck.hyperparameters(
            optimizer, 1 if self.adam else step, np.float64 if self.wide else self.dtype, lr
        )
        if self.hp_host is None or not np.array_equal(self.hp_host, hp):
            upload(hp, self.hp64 if self.wide else self.hp)
            self.hp_host = hp
        if self.schedule:
            self._set_schedule(upload, optimizer, follows)
        if self.adam:
            if self.steps_host != step - 1:
                upload(np.array([step - 1], dtype=np.int64), self.steps)
            self.steps_host = step  # what the counter holds after this step, unless skipped

    def _set_schedule(
        self, upload: Callable[[np.ndarray, Any], None], optimizer: Any, follows: Any
    ) -> None:
        """Upload the schedule block where it changed, and the global step counter where it is
        not ``follows``' step already."""
        schedule = None if follows is None else follows[0]
        key = (schedule, (optimizer.kind, getattr(optimizer, "decoupled", False)))
        if self.sched_host != key:
            upload(ck.schedule_block(optimizer, schedule), self.sched)
            self.sched_host = key
        if follows is None:
            self.count_host = None  # the counter is not read nor advanced
            return
        if self.count_host != follows[1]:
            upload(np.array([follows[1]], dtype=np.int64), self.count)
        self.count_host = follows[1] + 1  # schedule_lr advances it

    def record(self, kernels: KernelGetter) -> None:
        """The step's first kernels: ``hp`` of this step, from the device state."""
        if self.schedule:  # the schedule's rate of this step (the GEMMs' constants too)
            schedule_lr(kernels, self.hp, self.hp64, self.sched, self.count)
        if self.adam:  # Adam's block of this step (the GEMMs' constants too)
            adam_step_scalars(kernels, self.hp, self.hp64, self.steps)

    def counted(self, kernels: KernelGetter, status: Any) -> None:
        """After the update: Adam's step counter advanced unless ``status[STATUS_BAD]``."""
        if self.adam:
            count_step(kernels, self.steps, status)
