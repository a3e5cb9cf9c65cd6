"""The train step's one-thread kernels of scalars (``kernels/optimizers.cu``), wrapped as
:mod:`.launch` wraps the others (the same checks, no synchronisation): the learning rate of a
schedule and Adam's step scalars, computed in the recorded step from counters in device memory so
that a steady step uploads nothing, and the counter the update advances.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import catalogue as ck
from .launch import KernelGetter, _check, _float, _hp, _launch, _status


def schedule_lr(kernels: KernelGetter, hp: Any, hp64: Any, sched: Any, count: Any) -> None:
    """``hp64``'s learning rate and the slots derived from it set to the rate of global step
    ``count[0]`` (int64 ``(1,)``, then advanced) of the schedule block ``sched`` (float64
    ``(SCHED_SLOTS,)``, :func:`.catalogue.schedule_block`; one of kind 0 keeps ``hp64``'s rate
    and the counter), then ``hp`` = ``hp64`` in ``hp``'s dtype."""
    _hp("schedule_lr", hp, _float("schedule_lr", "hp", hp, 1))
    _hp("schedule_lr", hp64, np.float64)
    _check("schedule_lr", "sched", sched, np.float64, (ck.SCHED_SLOTS,))
    _check("schedule_lr", "count", count, np.int64, (1,))
    _launch(kernels, ck.schedule_lr(hp.dtype), 1, (hp, hp64, sched, count), 32)


def adam_step_scalars(kernels: KernelGetter, hp: Any, hp64: Any, steps: Any) -> None:
    """``hp`` = the float64 block ``hp64`` in ``hp``'s dtype, with Adam's ``HP_ALPHA`` and
    ``HP_EPS_HAT`` of step ``steps[0] + 1`` (int64 ``(1,)``) as ``optim.adam_scalars``."""
    _hp("adam_step_scalars", hp, _float("adam_step_scalars", "hp", hp, 1))
    _hp("adam_step_scalars", hp64, np.float64)
    _check("adam_step_scalars", "steps", steps, np.int64, (1,))
    _launch(kernels, ck.adam_step_scalars(hp.dtype), 1, (hp, hp64, steps), 32)


def count_step(kernels: KernelGetter, steps: Any, status: Any) -> None:
    """``steps[0] += 1`` (int64 ``(1,)``) unless ``status[STATUS_BAD]`` is set."""
    _check("count_step", "steps", steps, np.int64, (1,))
    _status("count_step", status)
    _launch(kernels, ck.count_step(), 1, (steps, status), 32)
