"""The status protocol: errors met on the device, raised at the host's next synchronisation.

Kernels set a sticky flag in a device status word (``kernels/common.cuh``) when an activation,
delta, loss or gradient is NaN or infinite; the update kernels then skip themselves, so no host
synchronisation is needed per step. :class:`StepErrors` remembers the optimizer states of the
queued steps and, when the host looks (:meth:`StepErrors.check`), raises what the words hold,
with the skipped steps' step counts taken back. :class:`DeviceLoss` is a queued step's loss,
read (and checked) at ``float()``; :class:`LossLedger` keeps the steps' losses on the device,
and their running total (:class:`DeviceLossSum`), so an epoch's losses are one transfer.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ...errors import NonFiniteLossError
from . import catalogue as ck
from .context import DeviceContext

#: Train steps queued without looking at the status word before the host looks anyway.
MAX_PENDING = 1024
#: Losses per block of the loss ledger (one device allocation per block, not per step).
LOSS_BLOCK = 256


class StepErrors:
    """The train steps' deferred errors: the queued steps' optimizer states, and the check."""

    def __init__(self, ctx: DeviceContext) -> None:
        self._ctx = ctx
        self._pending: list[dict[str, Any]] = []

    def queued(self, state: dict[str, Any]) -> None:
        """A step that advanced ``state`` was queued; look every :data:`MAX_PENDING` steps."""
        self._pending.append(state)
        if len(self._pending) >= MAX_PENDING:
            self.check()

    def check(self) -> None:
        """Read every device's status words (a synchronisation) and raise what they hold.

        Raises :class:`NonFiniteLossError` if a queued step met a NaN or infinity; its update
        and those of the steps queued after it were skipped, and their optimizer step counts are
        taken back, so parameters and state are those of the last good step. Raises
        :class:`RuntimeError` for a launch the kernels refused (an internal error).
        """
        for d in self._ctx.devices():
            host = d.status.get()
            if d.scratch_status.get()[ck.STATUS_LAUNCH]:
                d.scratch_status.fill(0)
                host[ck.STATUS_LAUNCH] = 1
            if host[ck.STATUS_LAUNCH]:
                d.status.fill(0)
                raise RuntimeError(
                    "a gpubp kernel was launched with a block size that is not a multiple of 32 "
                    "(an internal error; please report it)"
                )
            if not host[ck.STATUS_BAD]:
                continue
            skipped = int(host[ck.STATUS_SKIPPED])
            d.status.fill(0)
            for state in self._pending[len(self._pending) - skipped :] if skipped else []:
                state["step"] = int(state["step"]) - 1
            self._pending.clear()
            later = f" and the {skipped - 1} queued after it" if skipped > 1 else ""
            raise NonFiniteLossError(
                "a train step produced a NaN or infinite loss, activation, delta or gradient; "
                f"that step{later} was skipped and the parameters kept, so they and the optimizer "
                "state are those of the last good step. Lower the learning rate, or scale the "
                "inputs"
            )
        self._pending.clear()


class _Checks(Protocol):
    def check_status(self) -> None: ...


class DeviceLossSum:
    """A running float64 total of train steps' ``weight * loss`` kept on the device (the
    ledger's total while it is the open one): :meth:`read` is one transfer for any number of
    steps. ``total`` is a ``(1,)`` float64 device array."""

    __slots__ = ("_backend", "total")

    def __init__(self, backend: _Checks, total: Any) -> None:
        self._backend, self.total = backend, total

    def holds(self, value: Any, weight: int) -> bool:
        """Whether the step that gave ``value`` added ``weight * value`` to this total."""
        return isinstance(value, DeviceLoss) and value.sum is self and value.weight == weight

    def read(self) -> float:
        """The total (a synchronisation point: a deferred error is raised first)."""
        self._backend.check_status()
        return float(self.total.get()[0])


class LossLedger:
    """The train steps' losses on one device in one dtype, appended by each step on the device
    (``record_loss``, in the step's graph): the loss into the next slot of a block of
    :data:`LOSS_BLOCK`, and ``weight * loss`` into the open :class:`DeviceLossSum`'s total.
    The host mirrors the slot count, and uploads the ledger's words only for a new block or a
    new sum, never per step."""

    def __init__(self, cp: Any, dtype: Any, upload: Any) -> None:
        self._cp, self.dtype, self._upload = cp, np.dtype(dtype), upload
        self.words = cp.zeros(3, dtype=np.int64)  # block pointer, slots used, total's pointer
        self.sum: DeviceLossSum | None = None
        self._block: Any = None
        self._used = LOSS_BLOCK

    def next_slot(self, into: DeviceLossSum) -> Any:
        """Before a step that adds to ``into``: the 0-d device array its loss will be written
        to (a new block, or a new sum, uploads the ledger's words first)."""
        new_block = self._used >= LOSS_BLOCK
        if new_block:
            self._block, self._used = self._cp.empty(LOSS_BLOCK, dtype=self.dtype), 0
        if new_block or into is not self.sum:
            self.sum = into
            words = [self._block.data.ptr, self._used, into.total.data.ptr]
            self._upload(np.array(words, np.int64), self.words)
        slot = self._block[self._used]
        self._used += 1
        return slot


class DeviceLoss:
    """The loss of a queued train step: a device scalar, read (and checked) at ``float()``.

    Reading it is a synchronisation point: if a queued step met a NaN or infinity,
    :class:`~gpubp.errors.NonFiniteLossError` is raised here.

    Parameters
    ----------
    backend : object
        The backend that queued the step (its ``check_status()`` is called before reading).
    value : device array
        The 0-d device array holding the loss (:attr:`value`).
    sum : DeviceLossSum, optional
        The device total the step added ``weight * loss`` to.
    weight : int
        The step's batch rows.
    """

    __slots__ = ("_backend", "sum", "value", "weight")

    def __init__(
        self, backend: _Checks, value: Any, sum: DeviceLossSum | None = None, weight: int = 0
    ) -> None:
        self._backend = backend
        self.value = value
        self.sum, self.weight = sum, weight  # the device sum it was added to, times weight

    def __float__(self) -> float:
        self._backend.check_status()
        return float(self.value.get())

    def item(self) -> float:
        return float(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(float(self), dtype=dtype)

    def __repr__(self) -> str:
        return f"DeviceLoss({float(self)!r})"

    def __format__(self, spec: str) -> str:
        return format(float(self), spec)

    def __add__(self, other: Any) -> float:
        return float(self) + other

    __radd__ = __add__

    def __mul__(self, other: Any) -> float:
        return float(self) * other

    __rmul__ = __mul__

    def __sub__(self, other: Any) -> float:
        return float(self) - other

    def __truediv__(self, other: Any) -> float:
        return float(self) / other
