"""Learning-rate schedules: the one definition of their maths, which the CUDA step mirrors.

A :class:`Schedule` gives the learning rate of global step ``t`` (0 first) of ``T``.
:func:`gpubp.train.train` sets it on the optimizer every step with
:meth:`gpubp.optim.Optimizer.follow`, which also leaves the schedule and the step on the
optimizer, so that a backend may compute the rate itself: the CUDA backend's captured step
computes it on the device from a step counter (``schedule_lr`` in ``kernels/optimizers.cu``,
operation for operation as :meth:`Schedule.at`), so a steady step uploads nothing. The NumPy and
Numba backends read ``lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FORMULAS", "SCHEDULES", "Schedule"]

SCHEDULES: tuple[str, ...] = ("cosine", "constant")
#: The schedules that are a closed formula of the step, with their codes in the CUDA step's
#: schedule block (0 there: the host sets the rate).
FORMULAS: dict[str, int] = {"constant": 1, "cosine": 2}


@dataclass(frozen=True)
class Schedule:
    """A learning rate per global step.

    Parameters
    ----------
    kind : str
        ``cosine``: ``lr_t = lr (1 + cos(pi t / T)) / 2``, computed as ``lr c c`` with
        ``c = cos(pi t / 2T)`` (the same value, without the cancellation of ``1 + cos`` near
        ``t = T``, so that a device's ``cos``, a few ulps off, gives a rate a few ulps off);
        ``constant``: ``lr``.
    lr : float
        The peak (first) learning rate.
    total_steps : int
        ``T``, the steps of the whole run (at least 1 is used). Steps beyond it follow the
        formula (the cosine rises again).
    """

    kind: str
    lr: float
    total_steps: int

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"schedule={self.kind!r} is not supported; expected one of {', '.join(SCHEDULES)}"
            )

    @property
    def steps(self) -> int:
        """``T`` as the formula uses it (at least 1)."""
        return max(int(self.total_steps), 1)

    def at(self, step: int) -> float:
        """The learning rate of global step ``step`` (0 first), in float64."""
        if self.kind == "constant":
            return float(self.lr)
        c = math.cos(math.pi * step / (2 * self.steps))
        return float(self.lr) * c * c
