"""What every timed thing is: :class:`Candidate` (set up once, step many times), and the
cupy module the GPU candidates use."""

from __future__ import annotations

from typing import Any

from .problem import (
    CPU,
    Problem,
)
from .timing import run_steps


class Candidate:
    """One thing to time: :meth:`setup` once, then :meth:`step` many times.

    ``kind`` is ``backend``, ``torch`` or ``floor``; ``device`` is ``cpu`` or ``gpu``.
    """

    label: str = ""
    kind: str = ""
    device: str = CPU

    def setup(self, problem: Problem) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on the CPU)."""

    def timed(self, n: int) -> float:
        """Seconds for ``n`` steps, the device synchronised inside the timed region."""
        return run_steps(self, n)

    def reset(self) -> None:
        """Put the parameters back to the problem's initial values, in place.

        Done (untimed) before every sample: hundreds of steps on one batch would otherwise
        memorise it, and ever larger logits end in float underflow, which is slow on CPUs and
        would make later samples measure something else than earlier ones.
        """

    def validate(self, problem: Problem) -> float:
        """Worst relative error of one step from the problem's initial state (see subclasses)."""
        raise NotImplementedError

    def peak_bytes(self, problem: Problem) -> tuple[int | None, str]:
        """``(bytes, how)``: the memory one fresh setup and two steps hold at their peak."""
        return None, "not measured"


def cupy_module() -> Any:
    from ..backends.cuda.cupy_module import import_cupy

    return import_cupy()
